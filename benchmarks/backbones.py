"""The cost of one 12-frame clip for B/16 of each backbone family, with and without STAN.

    python benchmarks/backbones.py                 # CLIP, SigLIP 2 and PE-Core B/16, meanP and STAN, 224 px
    python benchmarks/backbones.py --reps 5 --frames 12

Each model is built from its release's architecture (OpenAI's ViT-B/16; open_clip's `ViT-B-16-SigLIP2` and
`PE-Core-B-16` configs read by `stanvid.checkpoints.timm_towers`), random weights, float32, eval mode.
`encode_video` of one clip (1, T, 3, 224, 224) is timed (best of `--reps` after a warm-up), its FLOPs counted by
`torch.utils.flop_counter.FlopCounterMode` on the real forward, and the achieved GFLOP/s compared with a 2048^3
fp32 matmul measured in the same run (before and after, the best of the two: the machine is shared, compare
ratios from one run). Only the video side is measured, so the text towers are built one layer deep with a
small vocabulary (they take no part in `encode_video`).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import stanvid
from stanvid.checkpoints.timm_towers import timm_tower_clip_config
from stanvid.models.config import ModelConfig, clip_preset

SIGLIP2_B16 = {
    "embed_dim": 768,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224", "timm_proj": "none"},
    "text_cfg": {"context_length": 64, "vocab_size": 256000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
                 "width": 768, "heads": 12, "layers": 12, "no_causal_mask": True, "proj_bias": True,
                 "pool_type": "last", "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}},
}  # fmt: skip
PE_CORE_B16 = {
    "embed_dim": 1024,
    "custom_text": True,
    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_pe_core_base_patch16_224", "timm_proj": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def clip_configs():
    clip = clip_preset("ViT-B/16")
    yield "CLIP ViT-B/16", clip
    yield "SigLIP 2 B/16", timm_tower_clip_config({"model_cfg": SIGLIP2_B16}, "ViT-B-16-SigLIP2")
    yield "PE-Core B/16", timm_tower_clip_config({"model_cfg": PE_CORE_B16}, "PE-Core-B-16")


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
    for name, clip in clip_configs():
        clip.text.layers, clip.text.vocab_size = 1, 1000  # the text side takes no part in encode_video
        for temporal in ("meanP", "stan"):
            cfg = ModelConfig(clip=clip, temporal=temporal, num_frames=args.frames)
            model = stanvid.VideoCLIP(cfg).eval()
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
