"""Where `stanvid demo` spends its time: rendering, decoding, augmentation, tokenizing, collation, the hand-off
from worker processes, the forward and backward, the optimizer and the evaluation, per way of running it.

    python benchmarks/demo_profile.py                    # the demo as it was (files, 1 worker) and as it is
    python benchmarks/demo_profile.py --steps 300 --pretrain-steps 1200 --modes held-w0-t2   # the full budget

Each mode runs the real demo (`stanvid.run_demo`, default corpus and model sizes, seed 0) under ``cProfile``,
with fewer optimizer steps (``--steps`` per transfer, ``--pretrain-steps``) so that a profile takes minutes.
A mode is ``SOURCE-wW-tT``: ``files`` reads every clip from its H.264 file each time it is used (the demo up
to issue 37), ``held`` decodes the corpus once into memory first (`DemoConfig.hold`); ``W`` DataLoader worker
processes per transfer; ``T`` torch threads (`DemoConfig.threads`).

Printed per mode: wall and CPU seconds (this process, and the worker processes it waited for), the seconds of
each stage as the demo measured them (each transfer split into its training and its evaluation), training
steps/s, and the cumulative seconds that the main process spent in the functions doing each part. With
worker processes, decoding, augmentation and collation of training batches happen in the workers, and the
main process only sees ``data wait`` (blocked on the workers, the hand-off included); without, they run in
the main process and ``data wait`` is their sum. cProfile adds a cost to every Python call, so the parts are
a breakdown; the wall and CPU seconds are the figures to compare, within one run of this script.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import tempfile
import time
from pathlib import Path

import torch

import stanvid

# part -> the (file suffix, function) pairs whose cumulative time it is
PARTS = {
    "rendering + encoding the corpus": [("demo/synth.py", "make_corpus")],
    "decoding the corpus into memory": [("demo/synth.py", "hold")],
    "pretraining": [("demo/pretrain.py", "pretrain_clip")],
    "decoding (read_frames, probe)": [("video/decode.py", "read_frames"), ("video/decode.py", "probe")],
    "frame transforms (crop, resize, normalize)": [("video/transforms.py", "__call__")],
    "tokenizing training captions": [("data/retrieval.py", "tokenize")],
    "collation (collate_pairs)": [("demo/transfer.py", "collate_pairs")],
    "data wait (next training batch)": [("training/loop.py", "_train_batches:loader")],
    "forward + backward (micro_step)": [("training/trainer.py", "micro_step")],
    "optimizer (clip, AdamW, schedule)": [("training/trainer.py", "optimizer_step")],
    "evaluation (similarity, both galleries)": [("demo/evaluate.py", "similarity")],
}
TRANSFERS = ("meanP", "seqTransf", "stan_selfattn", "stan_conv")


def cumulative(stats: pstats.Stats, targets: list[tuple[str, str]]) -> float:
    """Seconds inside the functions `targets`; ``_train_batches:loader`` is the DataLoader's ``__next__`` as
    called from the training loop (the data it waits for)."""
    total = 0.0
    for (filename, _, name), (_, _, _, cum, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for suffix, function in targets:
            if function == "_train_batches:loader":
                if filename.endswith("torch/utils/data/dataloader.py") and name == "__next__":
                    total += sum(v[3] for (f, _, n), v in callers.items() if n == "_train_batches")
            elif filename.endswith(suffix) and name == function:
                total += cum
    return total


def run_mode(mode: str, steps: int, pretrain_steps: int, root: Path) -> dict:
    source, workers, threads = mode.split("-")
    config = stanvid.DemoConfig.create(root / mode, seed=0, progress=False)
    config.pretrain.steps = pretrain_steps
    config.transfer.steps = steps
    config.transfer.num_workers = int(workers[1:])
    config.threads = int(threads[1:])
    config.hold = source == "held"
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    profile = cProfile.Profile()
    profile.enable()
    result = stanvid.run_demo(config)
    profile.disable()
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    stats = pstats.Stats(profile)
    stages = dict(result.stage_seconds)
    train = sum(result.models[name].train_seconds for name in TRANSFERS)
    return {
        "mode": mode,
        "wall_s": wall,
        "cpu_s": cpu,
        "workers_cpu_s": workers_cpu,
        "stages": stages,
        "train_s": train,
        "eval_s": sum(stages[name] for name in TRANSFERS) - train,
        "steps_per_s": len(TRANSFERS) * steps / train,
        "parts": {part: cumulative(stats, targets) for part, targets in PARTS.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["files-w1-t1", "held-w0-t2"])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per transfer (the demo: 300)")
    parser.add_argument("--pretrain-steps", type=int, default=100, help="pretraining steps (the demo: 1200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_mode(mode, args.steps, args.pretrain_steps, Path(tmp)) for mode in args.modes]
    print(
        f"`stanvid demo` (default corpus and model, seed 0) with {args.pretrain_steps} pretraining steps and "
        f"{args.steps} steps per transfer; torch {torch.__version__}"
    )

    def row(label: str, values: list[float]) -> None:
        print(f"{label:46}" + "".join(f"{v:>13.1f}" for v in values))

    print(f"{'':46}" + "".join(f"{r['mode']:>13}" for r in results))
    row("wall, s", [r["wall_s"] for r in results])
    row("CPU of the demo's process, s", [r["cpu_s"] for r in results])
    row("CPU of its worker processes, s", [r["workers_cpu_s"] for r in results])
    row("CPU busy, % (of one core)", [100 * (r["cpu_s"] + r["workers_cpu_s"]) / r["wall_s"] for r in results])
    print("stages (as the demo timed them), s")
    for stage in results[0]["stages"] | results[-1]["stages"]:
        row(f"  {stage}", [r["stages"].get(stage, 0.0) for r in results])
    row("  the 4 transfers' training", [r["train_s"] for r in results])
    row("  the 4 transfers' evaluation", [r["eval_s"] for r in results])
    row("training steps/s", [r["steps_per_s"] for r in results])
    print("cumulative seconds in the main process (cProfile)")
    for part in PARTS:
        row(f"  {part}", [r["parts"][part] for r in results])


if __name__ == "__main__":
    main()
