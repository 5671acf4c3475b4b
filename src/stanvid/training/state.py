"""What a training run carries besides its weights: the RNG states of every stream (saved in checkpoints and
restored on resume), the check that a recipe may resume a checkpoint, and the run log (JSONL, TensorBoard).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stanvid.errors import ConfigError
from stanvid.fileio import atomic_write_text
from stanvid.training.recipe import Recipe, field_default

# recipe keys that may change between an interrupted run and its resumption: they do not change the weights
RESUMABLE_CHANGES = (
    "name",
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.output_dir",
    "train.log_every",
    "train.tensorboard",
    "train.dist_timeout_minutes",
    "data.root",
    "data.num_workers",
    "data.test_annotations",
    "data.test_video_dir",
    "eval.",
)


# ---- RNG states ----------------------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The process's RNG states in types ``torch.load(weights_only=True)`` reads back."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cpu, cuda = torch_rng_state(device)
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": cpu,
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    set_torch_rng_state((state["torch"], state.get("cuda")), device)


def torch_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch generators a forward pass draws from (drop-path): the CPU's and, on CUDA, this device's."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_torch_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    """Restore what `torch_rng_state` returned (a CUDA state only on a CUDA device)."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Whatever runs inside (an evaluation) leaves the training RNG streams as they were."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def check_resumable(saved: dict[str, Any], recipe: Recipe, world: int, path: Path) -> None:
    """Refuse a resumption that would not continue the checkpoint's run exactly, naming what differs. A key the
    checkpoint's recipe lacks (written before the key existed) counts as its default. Streamed shards
    (``webdataset``) are read by processes x workers readers, so there ``data.num_workers`` must stay."""
    old, new = flatten(saved["recipe"]), flatten(recipe.to_dict())
    # checkpoints written before optim.accumulation existed accumulated independent micro-batches; with one
    # micro-batch per step the two kinds are the same computation
    old.setdefault("optim.accumulation", "independent")
    if old.get("optim.accumulation_steps") == new["optim.accumulation_steps"] == 1:
        old["optim.accumulation"] = new["optim.accumulation"]
    for key in set(new) - set(old):
        old[key] = field_default(key)
    free = RESUMABLE_CHANGES
    if recipe.data.dataset == "webdataset":
        free = tuple(k for k in RESUMABLE_CHANGES if k != "data.num_workers")
    changed = [
        key
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in free)
    ]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"cannot resume from {path}: the recipe differs from the checkpoint's ({shown})")
    if saved["world_size"] != world:
        raise ConfigError(
            f"cannot resume from {path} exactly: it was written by {saved['world_size']} process(es), this run "
            f"has {world} (the data order and the per-rank random states depend on it)"
        )


# ---- logging -------------------------------------------------------------------------------------------------


class RunLog:
    """Rank 0's JSONL log and optional TensorBoard writer; other ranks get a no-op."""

    def __init__(
        self, out_dir: Path | None, active: bool, tensorboard: bool, keep_until_step: int | None
    ) -> None:
        self.path = out_dir / "log.jsonl" if (out_dir is not None and active) else None
        self.writer = None
        if self.path is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            # a resumed run: drop what was logged after the checkpoint it continues from
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
            ]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            atomic_write_text(self.path, "")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "train.tensorboard: the tensorboard package is not installed; logging to log.jsonl only",
                    file=sys.stderr,
                )
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace(".", "/"), value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
