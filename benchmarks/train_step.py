"""Training step of the MSR-VTT ViT-B/32 recipe: time and peak memory per precision, with and without gradient
checkpointing, and the cost of exact accumulation against plain accumulation and one big step.

    python benchmarks/train_step.py                          # CPU fp32, 2 videos per step, plain / checkpointed
    python benchmarks/train_step.py --precision bf16         # bf16 autocast beside fp32, in one run
    python benchmarks/train_step.py --accumulation 4 --precision bf16 --checkpointing off
    python benchmarks/train_step.py --device cuda --batch 16 --accumulation 4 --precision fp16
    python benchmarks/train_step.py --model demo --batch 32 --precision bf16   # the demo's small model

The step is the real one, `stanvid.Trainer` built from ``configs/stan_msrvtt_b32.yaml``: STAN (depth 4) on a
randomly initialised ViT-B/32, 12 frames at 224 px and 32-token captions, the symmetric InfoNCE at tau 0.01,
backward through both towers, clipping, AdamW with the CLIP / STAN parameter groups, the schedule. Only the
batch size (``--batch``; the recipe has 16 per GPU, too slow for a CPU benchmark) and the precision differ from
the recipe. Data loading is not included: the batches are random tensors already in memory.

``--accumulation K`` adds three ways to train on K x ``--batch`` videos per optimizer step: one big step (the
whole batch at once), K independent micro-batches (``optim.accumulation: independent``: each its own
contrastive problem, the old behaviour) and K exact micro-batches (``optim.accumulation: exact``: one
contrastive problem over all of them through cached embeddings; one extra forward pass per micro-batch).

Time is the median of ``--reps`` timed optimizer steps after one warm-up step, the settings compared with each
other interleaved on one trainer (each round times one step of each; see `speeds`). Peak memory is measured in a
fresh process per setting, over the second optimizer step (the first allocates gradients and AdamW state). On
CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the step. On the CPU there is no
allocator counter: the child samples its resident set every 0.5 ms during the step and reports the growth
above the level before it, with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that every tensor of
that size or more is its own mapping, returned to the system when freed (with glibc's default, adaptive
threshold, freed activations stay in the heap and the next step reuses them unseen, which under-reports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peak_memory import peak_bytes_during

import stanvid
from stanvid import Trainer, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "stan_msrvtt_b32.yaml"
MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class Setting:
    """One way to take an optimizer step: ``mode`` is ``single`` (one batch of ``batch``), ``big`` (one batch of
    ``batch x k``), ``independent`` or ``exact`` (k micro-batches of ``batch``)."""

    precision: str
    checkpointing: bool
    batch: int
    k: int = 1
    mode: str = "single"
    model: str = "vit-b32"  # or "demo": the model `stanvid demo` trains, on its clips (8 frames, 32 px)

    @property
    def label(self) -> str:
        what = {
            "single": f"one batch of {self.batch}",
            "big": f"one batch of {self.batch * self.k}",
            "independent": f"{self.k} x {self.batch} independent",
            "exact": f"{self.k} x {self.batch} exact",
        }[self.mode]
        model = ", demo model" if self.model == "demo" else ""
        return f"{what}, {self.precision}{model}" + (", checkpointed" if self.checkpointing else "")


def build(setting: Setting, device: str, precision: str | None = None) -> tuple[Trainer, list[dict]]:
    """The trainer of ``setting`` (in ``precision`` if given) and its step's micro-batches (one for ``single``
    and ``big``)."""
    batch = setting.batch * setting.k if setting.mode == "big" else setting.batch
    micro = setting.k if setting.mode in ("exact", "independent") else 1
    recipe = load_recipe(
        RECIPE,
        [
            f"train.batch_size={batch}",
            f"model.grad_checkpointing={setting.checkpointing}",
            f"train.precision={precision or setting.precision}",
            f"optim.accumulation_steps={micro}",
            f"optim.accumulation={'independent' if setting.mode == 'independent' else 'exact'}",
        ],
    )
    torch.manual_seed(0)
    size, frames, length = recipe.data.input_size, recipe.data.num_frames, recipe.data.text_length
    if setting.model == "demo":
        demo = stanvid.DemoConfig.create()
        model = stanvid.VideoCLIP(stanvid.demo_model_config(demo))
        size, frames, length = demo.corpus.image_size, demo.corpus.num_frames, demo.context_length
    else:
        model = stanvid.create_model(
            "ViT-B/32",
            temporal=recipe.model.temporal,
            stan_depth=recipe.model.stan_depth,
            num_frames=recipe.model.num_frames,
        )
    trainer = Trainer(model, recipe, steps_per_epoch=1000, device=device)
    model.train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(micro):
        tokens = torch.randint(1, 49000, (batch, length), generator=g)
        tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end of text
        batches.append({"video": torch.randn(batch, frames, 3, size, size, generator=g), "tokens": tokens})
    return trainer, batches


def step(trainer: Trainer, batches: list[dict], mode: str) -> None:
    if mode == "exact":
        trainer.accumulate_exact(batches)
    else:
        for i, batch in enumerate(batches):
            trainer.micro_step(batch, divisor=len(batches), sync=i == len(batches) - 1)
    trainer.optimizer_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()


def speeds(settings: list[Setting], args: argparse.Namespace) -> list[dict]:
    """Step times of ``settings`` (same ``batch`` and ``k``) on one trainer, interleaved: every round times one
    step of each setting, so a change in the machine's load (it is shared) slows all of them alike. The trainer
    switches precision (its autocast) and gradient checkpointing between steps; the weights it trains do not
    change the time of a step."""
    mixed = [s.precision for s in settings if s.precision != "fp32"]
    base = max(settings, key=lambda s: s.k if s.mode != "single" else 1)
    trainer, micro = build(
        Setting(base.precision, False, base.batch, base.k, "exact", base.model),
        args.device,
        (mixed or ["fp32"])[0],
    )
    whole = [{key: torch.cat([b[key] for b in micro]) for key in micro[0]}]  # the k micro-batches as one
    used = {"fp32": "fp32", **{p: trainer.precision for p in mixed}}  # what this device trains them in

    def run(setting: Setting) -> float:
        trainer.precision = used[setting.precision]
        trainer.model.set_grad_checkpointing(setting.checkpointing)
        start = time.perf_counter()
        step(trainer, whole if setting.mode in ("single", "big") else micro, setting.mode)
        return time.perf_counter() - start

    for setting in settings:
        run(setting)  # warm-up
    times: list[list[float]] = [[] for _ in settings]
    for _ in range(args.reps):
        for i, setting in enumerate(settings):
            times[i].append(run(setting))
    rows = []
    for setting, ts in zip(settings, times, strict=True):
        median = statistics.median(ts)
        videos = setting.batch * (1 if setting.mode == "single" else setting.k)
        rows.append(
            {"step_s": median, "videos_per_s": videos / median, "trained_in": used[setting.precision]}
        )
    return rows


def memory_child(setting: Setting, device: str) -> None:
    trainer, batches = build(setting, device)
    step(trainer, batches, setting.mode)  # the first step allocates gradients and optimizer state
    peak = peak_bytes_during(lambda: step(trainer, batches, setting.mode), trainer.device.type)
    print(json.dumps({"peak_mib": peak / 2**20}))


def memory(setting: Setting, device: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    cmd = [sys.executable, __file__, "--device", device, "--child", json.dumps(asdict(setting))]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def measure(settings: list[Setting], args: argparse.Namespace) -> list[dict]:
    rows = []
    for setting, timed in zip(settings, speeds(settings, args), strict=True):
        row = {**asdict(setting), "label": setting.label, **timed}
        if not args.no_memory:
            row["peak_mib"] = memory(setting, args.device)
        mem = f"peak {row['peak_mib']:7.0f} MiB" if "peak_mib" in row else ""
        print(
            f"  {setting.label:<44} {row['step_s']:7.2f} s/step  {row['videos_per_s']:6.2f} videos/s  {mem}",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="videos per (micro-)batch (the recipe: 16 per GPU)")
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="measured beside fp32"
    )
    p.add_argument("--accumulation", type=int, default=0, help="K: compare exact, independent, one big step")
    p.add_argument("--checkpointing", default="both", choices=["both", "off", "on"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--model",
        default="vit-b32",
        choices=["vit-b32", "demo"],
        help="the recipe's ViT-B/32 + STAN, or the small model `stanvid demo` trains (8 frames of 32 px)",
    )
    p.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); also in the memory children"
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        memory_child(Setting(**json.loads(args.child)), args.device)
        return
    checkpointing = {"both": [False, True], "off": [False], "on": [True]}[args.checkpointing]
    precisions = ["fp32"] if args.precision == "fp32" else ["fp32", args.precision]
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.model == "demo":
        print("the demo's model (stanvid.demo_model_config): 8 frames, 32 px, 16 tokens")
    else:
        print(f"{RECIPE.name}: ViT-B/32 + STAN depth 4, 12 frames, 224 px, 32 tokens")
    rows = measure(
        [Setting(pr, ck, args.batch, model=args.model) for ck in checkpointing for pr in precisions], args
    )
    for ck in checkpointing:
        by = {r["precision"]: r for r in rows if r["checkpointing"] == ck}
        if len(by) == 2:
            ratio = by["fp32"]["step_s"] / by[args.precision]["step_s"]
            print(f"  {args.precision}{', checkpointed' if ck else ''}: {ratio:.2f}x the speed of fp32")
    if args.accumulation > 1:
        k = args.accumulation
        for ck in checkpointing:
            modes = ("big", "independent", "exact")
            settings = [Setting(args.precision, ck, args.batch, k, m, args.model) for m in modes]
            acc = dict(zip(modes, measure(settings, args), strict=True))
            rows += acc.values()
            exact = acc["exact"]
            line = (
                f"  exact vs independent: {exact['step_s'] / acc['independent']['step_s']:.2f}x the time; "
                f"vs one big step: {exact['step_s'] / acc['big']['step_s']:.2f}x"
            )
            if "peak_mib" in exact:
                line += f"; memory {exact['peak_mib'] / acc['big']['peak_mib']:.2f}x the big step's"
            print(line)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
