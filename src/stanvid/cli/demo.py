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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stanvid.demo.run import DemoConfig, results_table, run_demo

    result = run_demo(
        DemoConfig.create(
            args.out,
            quick=args.quick,
            seed=args.seed,
            progress=not args.no_progress,
            mug=args.mug,
            precision=args.precision,
        )
    )
    print(results_table(result.results))
    print(f"report: {result.out / 'report.md'}  model: {result.out / 'model'}")
    return 0
