"""`stanvid demo [--out DIR] [--quick] [--seed N]`: what temporal modeling buys, end to end, on this machine.

Generates a small video-text corpus (real encoded videos; captions about appearance and captions that only
frame order can answer), pretrains a small image-text CLIP on single frames, transfers it to video with
meanP, seqTransf, STAN self-attention and STAN conv under the same budget, and writes results.json,
report.md, chart.png and contact_sheet.png to DIR (default ./stanvid-demo), with the trained STAN model in
DIR/model (`stanvid.load_model("DIR/model")`). A few minutes on 2 CPU cores; --quick: the same pipeline,
smaller, in well under a minute (its numbers only show that everything runs). --mug adds a row: the STAN
self-attention model trained and scored with Mug-STAN's token-by-frame head (one more transfer run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="generate data, pretrain a small CLIP, compare temporal modules, write a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=Path("stanvid-demo"), help="output folder (default: ./stanvid-demo)"
    )
    p.add_argument("--quick", action="store_true", help="the same pipeline, smaller (well under a minute)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the corpus and of every training run (default 0)"
    )
    p.add_argument(
        "--mug",
        action="store_true",
        help="add a Mug-STAN row: STAN self-attention trained and scored with Mug-STAN's head",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="precision of the video training runs (default fp32, the faster for the demo's small model; "
        "bf16 trains under bf16 autocast on a CPU with native bf16)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch compute threads (default: the cores, at most 4; another count can move the table a few points)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def sleeping_threads_when_busy() -> bool:
    """On a machine already busy (1-minute load average at least its cores), let torch's compute threads sleep
    between operations (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning; returns whether it did.

    The demo's model is small, so a training step is thousands of short parallel regions; with OpenMP's default
    spin-waiting, two threads that the scheduler keeps taking away wait for each other at every one (a training
    step of the demo's model on a shared 2-core machine: 7.7 s spinning, 0.65 s sleeping, 1.6 s on one thread;
    docs/speed.md). A quiet machine is left as it is. `stanvid.cli.main` calls it before anything loads torch
    (OpenMP reads the policy once, when torch loads); a policy the user set is kept."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or not hasattr(os, "getloadavg"):
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.getloadavg()[0] < cores:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def run(args: argparse.Namespace) -> int:
    if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" and not args.no_progress:
        print("compute threads sleep between operations (OMP_WAIT_POLICY=PASSIVE)", file=sys.stderr)
    from stanvid.demo.run import DemoConfig, results_table, run_demo

    result = run_demo(
        DemoConfig.create(
            args.out,
            quick=args.quick,
            seed=args.seed,
            progress=not args.no_progress,
            mug=args.mug,
            precision=args.precision,
            threads=args.threads,
        )
    )
    print(results_table(result.results))
    print(f"report: {result.out / 'report.md'}  model: {result.out / 'model'}")
    return 0
