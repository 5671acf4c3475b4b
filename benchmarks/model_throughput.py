"""Model throughput: videos/s, achieved GFLOP/s and the fraction of this machine's matmul peak.

    python benchmarks/model_throughput.py                      # STAN and meanP, ViT-B/32, 12 frames, batch 2
    python benchmarks/model_throughput.py --arch ViT-B/16 --device cuda
    python benchmarks/model_throughput.py --precision-only     # only the fp32 / bf16 / int8 inference table

Inference by precision (`stanvid.precision`): `encode_video` of the STAN model at fp32, bf16 (autocast) and
int8 (dynamic quantization, CPU), each as videos/s and as a fraction of the matmul peak *of its own dtype*
measured in the same run: a 2048^3 fp32 matmul, the same in bf16, and for int8 a dynamically quantized
2048x2048 linear layer on 2048 rows (activation quantization included, as the model pays it). The GFLOP count is
the fp32 forward's for all three (the same multiply-adds, in other arithmetic).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the real forward (and forward + backward for
the training step), so they are the work done, not an estimate. The peak is a large square fp32 matmul measured
in the same run, before and after the model timings (the best of the two), because this machine is shared and
noisy: compare ratios from one run. Training step = vision tower forward, a contrastive loss against fixed
random text embeddings, backward, AdamW step. Peak memory of a training step is measured in a fresh process per
setting (RSS growth over the step, sampled every 0.5 ms, on CPU; `max_memory_allocated` on CUDA), with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from peak_memory import peak_bytes_during
from torch.utils.flop_counter import FlopCounterMode

import stanvid


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def half_matmul_peak(device: str, n: int, reps: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def int8_linear_peak(n: int, reps: int) -> float:
    """GFLOP/s of a dynamically quantized n x n linear layer on n rows (what int8 inference runs)."""
    from stanvid import quantize_int8

    layer = quantize_int8(torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)))
    x = torch.randn(n, n)
    with torch.inference_mode():
        best = time_best(lambda: layer(x), "cpu", reps)
    return 2 * n**3 / best / 1e9


def dtype_peaks(device: str, n: int, reps: int, precisions: list[str]) -> dict[str, float]:
    peaks = {}
    for name in precisions:
        if name == "fp32":
            peaks[name] = matmul_peak(device, n, reps)
        elif name in ("bf16", "fp16"):
            dtype = torch.bfloat16 if name == "bf16" else torch.float16
            peaks[name] = half_matmul_peak(device, n, reps, dtype)
        else:
            peaks[name] = int8_linear_peak(n, reps)
    return peaks


def measure_precisions(args, precisions: list[str]) -> list[dict]:
    """encode_video of the STAN model at each precision; same inputs, same FLOPs."""
    from stanvid import prepare_for_inference

    model = build(args, "stan").eval()
    size = model.config.clip.vision.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=args.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        reference = model.encode_video(video)
    flops = counter.get_total_flops()
    rows = []
    for name in precisions:
        runner = prepare_for_inference(model, name, args.device)

        def run(runner=runner):
            with runner.autocast():
                return runner.model.encode_video(video)

        with torch.inference_mode():
            seconds = time_best(run, args.device, args.reps)
            cosine = F.cosine_similarity(run().float(), reference, dim=-1).min().item()
        rows.append(
            {
                "precision": runner.precision,
                "videos_s": args.batch / seconds,
                "gflops": flops / seconds / 1e9,
                "min_cosine_to_fp32": cosine,
            }
        )
    return rows


def print_precisions(args) -> list[dict]:
    precisions = args.precisions.split(",")
    if args.device == "cuda":
        precisions = [p for p in precisions if p != "int8"]
    n = 4096 if args.device == "cuda" else 2048
    before = dtype_peaks(args.device, n, args.reps + 2, precisions)
    rows = measure_precisions(args, precisions)
    after = dtype_peaks(args.device, n, args.reps + 2, precisions)
    fp32_speed = next((r["videos_s"] for r in rows if r["precision"] == "fp32"), None)
    print(
        f"inference by precision: STAN depth {args.depth}, {args.arch}, {args.frames} frames, batch {args.batch}; "
        f"peaks of each dtype measured before and after (best of the two)"
    )
    print(
        f"{'precision':<9} {'videos/s':>9} {'vs fp32':>8} {'GFLOP/s':>8} {'own peak':>9} {'of peak':>8} "
        f"{'min cos':>8}"
    )
    for r in rows:
        r["peak_gflops"] = max(before[r["precision"]], after[r["precision"]])
        r["fraction_of_own_peak"] = r["gflops"] / r["peak_gflops"]
        ratio = r["videos_s"] / fp32_speed if fp32_speed else float("nan")
        print(
            f"{r['precision']:<9} {r['videos_s']:>9.3f} {ratio:>7.2f}x {r['gflops']:>8.1f} "
            f"{r['peak_gflops']:>9.1f} {r['fraction_of_own_peak']:>8.1%} {r['min_cosine_to_fp32']:>8.5f}"
        )
    return rows


def build(args, temporal: str, checkpointing: bool = False):
    torch.manual_seed(0)
    model = stanvid.create_model(args.arch, temporal=temporal, stan_depth=args.depth, num_frames=args.frames)
    model.set_grad_checkpointing(checkpointing)
    return model.to(args.device)


def train_step_fn(model, video, targets, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        emb = F.normalize(model.encode_video(video), dim=-1)  # (B, D)
        logits = emb @ targets.t() * 100.0
        labels = torch.arange(len(emb), device=emb.device)
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)
        loss.backward()
        optimizer.step()

    return step


def time_best(fn, device: str, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def setup(args, temporal: str, checkpointing: bool = False):
    """Model, a random video batch and the training step (vision tower + branch trained, text frozen)."""
    model = build(args, temporal, checkpointing)
    size = model.config.clip.vision.image_size
    video = torch.randn(args.batch, args.frames, 3, size, size, device=args.device)
    params = [p for n, p in model.named_parameters() if n.startswith(("visual.", "temporal."))]
    for p in model.text.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    targets = F.normalize(torch.randn(args.batch, model.config.clip.embed_dim, device=args.device), dim=-1)
    return model, video, train_step_fn(model, video, targets, optimizer)


def measure(args, temporal: str) -> dict:
    model, video, step = setup(args, temporal)

    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_video(video)
    infer_flops = counter.get_total_flops()
    with torch.inference_mode():
        infer_s = time_best(lambda: model.encode_video(video), args.device, args.reps)

    model.train()
    with FlopCounterMode(display=False) as counter:
        step()
    train_flops = counter.get_total_flops()
    train_s = time_best(step, args.device, args.reps)
    return {
        "temporal": temporal,
        "gflop_per_video_forward": infer_flops / args.batch / 1e9,
        "infer_videos_s": args.batch / infer_s,
        "infer_gflops": infer_flops / infer_s / 1e9,
        "train_videos_s": args.batch / train_s,
        "train_gflops": train_flops / train_s / 1e9,
    }


def memory_child(args) -> None:
    """Runs in a fresh process: one training step, prints peak memory growth in MiB."""
    model, _, step = setup(args, args.temporal, args.checkpointing)
    model.train()
    step()  # the first step allocates gradients and AdamW state; the second shows the step's own peak
    peak = peak_bytes_during(step, args.device)
    print(json.dumps({"peak_mib": peak / 2**20}))


def memory(args, temporal: str, checkpointing: bool) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        "--temporal",
        temporal,
        "--arch",
        args.arch,
        "--frames",
        str(args.frames),
        "--depth",
        str(args.depth),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
    ]
    if checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/32")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--temporals", default="stan,meanP")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--precisions", default="fp32,bf16,int8", help="inference precisions compared (stanvid.precision)"
    )
    p.add_argument("--precision-only", action="store_true", help="only the inference-by-precision table")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--temporal", default="stan", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    by_precision = print_precisions(args)
    if args.precision_only:
        if args.json:
            print(json.dumps({"precisions": by_precision}, indent=2))
        return
    print()
    peak_n = 4096 if args.device == "cuda" else 2048
    peak_before = matmul_peak(args.device, peak_n, args.reps + 2)
    rows = [measure(args, t) for t in args.temporals.split(",")]
    peak = max(peak_before, matmul_peak(args.device, peak_n, args.reps + 2))
    print(
        f"{args.arch}, {args.frames} frames, batch {args.batch}, STAN depth {args.depth}; "
        f"fp32 matmul peak {peak:.1f} GFLOP/s ({peak_n}^3)"
    )
    header = (
        f"{'model':<8} {'GFLOP/video':>11} {'infer vid/s':>11} {'GFLOP/s':>8} {'of peak':>7} "
        f"{'train vid/s':>11} {'GFLOP/s':>8} {'of peak':>7}"
    )
    print(header)
    for r in rows:
        r["infer_fraction_of_peak"] = r["infer_gflops"] / peak
        r["train_fraction_of_peak"] = r["train_gflops"] / peak
        print(
            f"{r['temporal']:<8} {r['gflop_per_video_forward']:>11.1f} {r['infer_videos_s']:>11.3f} "
            f"{r['infer_gflops']:>8.1f} {r['infer_fraction_of_peak']:>7.1%} {r['train_videos_s']:>11.3f} "
            f"{r['train_gflops']:>8.1f} {r['train_fraction_of_peak']:>7.1%}"
        )
    if not args.no_memory:
        print("peak memory of one training step (MiB above model, gradients and AdamW state):")
        for r in rows:
            r["train_peak_mib"] = memory(args, r["temporal"], False)
            r["train_peak_mib_checkpointing"] = memory(args, r["temporal"], True)
            print(
                f"  {r['temporal']:<8} plain {r['train_peak_mib']:8.0f}   "
                f"gradient checkpointing {r['train_peak_mib_checkpointing']:8.0f}"
            )
    if args.json:
        print(json.dumps({"peak_gflops": peak, "rows": rows, "precisions": by_precision}, indent=2))


if __name__ == "__main__":
    main()
