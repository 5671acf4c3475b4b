"""The cost of one 12-frame clip for B/16 of each backbone family, with and without STAN.

    python benchmarks/backbones.py                 # CLIP, SigLIP 2 and PE-Core B/16, meanP and STAN, 224 px
    python benchmarks/backbones.py --reps 5 --frames 12

Each model is built from its release's architecture by `stanvid.create_model` (OpenAI's `ViT-B/16`; open_clip's
`ViT-B-16-SigLIP2` and `PE-Core-B-16` configs), random weights, float32, eval mode.
`encode_video` of one clip (1, T, 3, 224, 224) is timed (best of `--reps` after a warm-up), its FLOPs counted by
`torch.utils.flop_counter.FlopCounterMode` on the real forward, and the achieved GFLOP/s compared with a 2048^3
fp32 matmul measured in the same run (before and after, the best of the two: the machine is shared, compare
ratios from one run). Only the video side is measured (the text towers take no part in `encode_video`).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import stanvid

# OpenAI's ViT-B/16 and open_clip's release configs, by the names `stanvid.create_model` builds them from
BACKBONES = (
    ("CLIP ViT-B/16", "ViT-B/16"),
    ("SigLIP 2 B/16", "ViT-B-16-SigLIP2"),
    ("PE-Core B/16", "PE-Core-B-16"),
)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(model: stanvid.VideoCLIP, video: torch.Tensor, reps: int) -> tuple[float, float]:
    """(seconds of the best pass, GFLOP of one pass)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # its module hooks need autograd tensors
        model.encode_video(video)
    with torch.inference_mode():
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            model.encode_video(video)
            best = min(best, time.perf_counter() - start)
    return best, counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak()
    video = torch.randn(1, args.frames, 3, 224, 224)
    rows = []
    for name, release in BACKBONES:
        for temporal in ("meanP", "stan"):
            model = stanvid.create_model(release, temporal=temporal, num_frames=args.frames).eval()
            seconds, gflop = measure(model, video, args.reps)
            rows.append((name, temporal, gflop, seconds, gflop / seconds))
            del model
    peak = max(peak, matmul_peak())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s"
    )
    print("| backbone | temporal | GFLOP / clip | seconds / clip | GFLOP/s | of matmul peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, temporal, gflop, seconds, rate in rows:
        print(f"| {name} | {temporal} | {gflop:.0f} | {seconds:.2f} | {rate:.0f} | {rate / peak:.0%} |")


if __name__ == "__main__":
    main()
