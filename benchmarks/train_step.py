"""Training step of the MSR-VTT ViT-B/32 recipe: videos/s and peak memory, with and without gradient checkpointing.

    python benchmarks/train_step.py                         # CPU, 2 videos per step (the recipe's 16 on a GPU)
    python benchmarks/train_step.py --device cuda --batch 16

The step is the real one, `stanvid.Trainer` built from ``configs/stan_msrvtt_b32.yaml``: STAN (depth 4)
on a randomly initialised ViT-B/32, 12 frames at 224 px and 32-token captions, the symmetric InfoNCE over the
batch at tau 0.01, backward through both towers, clipping, AdamW with the CLIP / STAN parameter groups, the
schedule. Only the batch size (``--batch``; the recipe has 16 per GPU, too slow for a CPU benchmark) and the
precision (the recipe's fp16 needs CUDA; the CPU runs fp32) differ from the recipe. Data loading is not
included: the batch is random tensors already in memory.

Videos/s is the batch size over the median of ``--reps`` timed steps, after one warm-up step. Peak memory is
measured in a fresh process per setting, over the second step (the first allocates gradients and AdamW
state): on the CPU the growth of the resident set above its level before the step, sampled every 0.5 ms; on
CUDA ``torch.cuda.max_memory_allocated`` above the memory allocated before the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peak_memory import peak_bytes_during

import stanvid
from stanvid import Trainer, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "stan_msrvtt_b32.yaml"


def build(args: argparse.Namespace, checkpointing: bool) -> tuple[Trainer, dict]:
    recipe = load_recipe(
        RECIPE, [f"train.batch_size={args.batch}", f"model.grad_checkpointing={checkpointing}"]
    )
    torch.manual_seed(0)
    model = stanvid.create_model(
        "ViT-B/32",
        temporal=recipe.model.temporal,
        stan_depth=recipe.model.stan_depth,
        num_frames=recipe.model.num_frames,
    )
    trainer = Trainer(model, recipe, steps_per_epoch=1000, device=args.device)
    model.train()
    g = torch.Generator().manual_seed(0)
    size, frames, length = recipe.data.input_size, recipe.data.num_frames, recipe.data.text_length
    tokens = torch.randint(1, 49000, (args.batch, length), generator=g)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end of text
    batch = {"video": torch.randn(args.batch, frames, 3, size, size, generator=g), "tokens": tokens}
    return trainer, batch


def step(trainer: Trainer, batch: dict) -> None:
    trainer.micro_step(batch)
    trainer.optimizer_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()


def speed(args: argparse.Namespace, checkpointing: bool) -> dict:
    trainer, batch = build(args, checkpointing)
    step(trainer, batch)  # warm-up
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step(trainer, batch)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_s": median, "videos_per_s": args.batch / median, "precision": trainer.precision}


def memory_child(args: argparse.Namespace) -> None:
    trainer, batch = build(args, args.checkpointing)
    step(trainer, batch)  # the first step allocates gradients and optimizer state
    peak = peak_bytes_during(lambda: step(trainer, batch), trainer.device.type)
    print(json.dumps({"peak_mib": peak / 2**20}))


def memory(args: argparse.Namespace, checkpointing: bool) -> float:
    cmd = [sys.executable, __file__, "--memory-child", "--batch", str(args.batch), "--device", args.device]
    if checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="videos per step (the recipe: 16 per GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{RECIPE.name}: ViT-B/32 + STAN depth 4, 12 frames, 224 px, 32 tokens; batch {args.batch} per step"
    )
    rows = []
    for checkpointing in (False, True):
        row = {"grad_checkpointing": checkpointing, **speed(args, checkpointing)}
        if not args.no_memory:
            row["peak_mib"] = memory(args, checkpointing)
        rows.append(row)
        mem = f"{row['peak_mib']:8.0f} MiB" if "peak_mib" in row else ""
        label = "gradient checkpointing" if checkpointing else "plain"
        print(
            f"  {label:<23} {row['precision']}  {row['step_s']:7.2f} s/step  {row['videos_per_s']:7.3f} videos/s  "
            f"peak {mem}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
