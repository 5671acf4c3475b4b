"""Does the default (`auto`) index find what a float32 index finds, with a trained model?

    stanvid demo --out stanvid-demo                                 # once: a trained STAN model and its corpus
    python benchmarks/precision_agreement.py --demo stanvid-demo    # both indexes, every test caption as a query

`benchmarks/index.py --pipeline` compares the two precisions on random weights, where every video embedding is
nearly the same vector and the top-1 is decided by gaps smaller than bf16's rounding. This script uses the
demo's trained model on the demo's test clips (copied into a temporary folder), builds a `--precision` index and
a float32 index, and asks every test caption of the demo (appearance and order) against both. It prints how many
top-1 hits are identical (query in the index's own precision, and in float32), and how many are right.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stanvid import build_index, open_index, resolve_precision

CAPTION_FILES = ("test_appearance.csv", "test_order.csv")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", default="stanvid-demo", help="output folder of `stanvid demo`")
    parser.add_argument("--precision", default="auto", help="the precision compared with fp32 (default auto)")
    args = parser.parse_args()
    demo = Path(args.demo)
    queries = []  # (video id, caption)
    for name in CAPTION_FILES:
        with open(demo / "data" / name, newline="") as f:
            queries += [(row["video"], row["caption"]) for row in csv.DictReader(f)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for video in {v for v, _ in queries}:
            shutil.copy(demo / "data" / "videos" / f"{video}.mp4", folder / f"{video}.mp4")
        seconds = {}
        for precision in (args.precision, "fp32"):
            start = time.perf_counter()
            build_index(
                folder,
                Path(tmp) / precision,
                demo / "model",
                precision=precision,
                device="cpu",
                progress=False,
            )
            seconds[precision] = time.perf_counter() - start
        with (
            open_index(Path(tmp) / args.precision, precision=args.precision, device="cpu") as fast,
            open_index(Path(tmp) / args.precision, precision="fp32", device="cpu") as fast_fp32_query,
            open_index(Path(tmp) / "fp32", precision="fp32", device="cpu") as ref,
        ):
            same = same_fp32_query = right_fast = right_ref = 0
            for video, caption in queries:
                truth = f"{video}.mp4"
                a, b = fast.search(caption, k=1)[0].relpath, ref.search(caption, k=1)[0].relpath
                same += a == b
                same_fp32_query += fast_fp32_query.search(caption, k=1)[0].relpath == b
                right_fast += a == truth
                right_ref += b == truth
    n = len(queries)
    resolved = resolve_precision(args.precision, torch.device("cpu"))
    print(
        f"{n} captions over {len({v for v, _ in queries})} clips; index {args.precision} ({resolved}) vs fp32\n"
        f"top-1 identical: {same}/{n} ({same / n:.0%}); with the query in fp32: {same_fp32_query}/{n}\n"
        f"top-1 right: {args.precision} {right_fast}/{n}, fp32 {right_ref}/{n}\n"
        f"build seconds: {args.precision} {seconds[args.precision]:.1f}, fp32 {seconds['fp32']:.1f}"
    )


if __name__ == "__main__":
    main()
