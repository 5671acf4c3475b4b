"""The training loop: `fit(model, train_set, recipe)` on one process or under torchrun, resumable exactly.

What one optimizer step does (the official STAN recipe, ``configs/exp/stan/stan_*_hf.py``):

* **Retrieval**: encode the batch's videos and captions, gather both over all ranks with gradient and take the
  symmetric InfoNCE over the global batch, the two directions summed (`stanvid.losses.contrastive_loss`). The
  temperature is fixed (logit scale ``1 / tau``, as the official configs set it) or learned like CLIP's
  (``train.temperature: learnable``; the log scale is clamped at ``ln 100`` as CLIP does).
* **Recognition**: the class names are encoded once by the text encoder, which stays frozen, and the video side
  is trained with cross-entropy against those text embeddings at the same logit scale (the official
  recognizer's ``task="recognition"``), or through a linear head (``model.classifier: linear``) initialised to
  that text classifier, so it starts from the zero-shot solution (unverified choice: the paper gives no head).
* **AdamW** with parameter groups: CLIP's parameters at ``optim.lr``, the new ones
  (``model.is_new_parameter``: the STAN branch, seqTransf; and a linear head) at ``lr x new_param_lr_mult``;
  weight decay per ``optim.no_decay`` (see `param_groups`); the learnable temperature is never decayed.
* **Schedule**, per optimizer step: a linear ramp from ``warmup_start_factor`` to 1 over ``warmup_epochs``,
  then cosine or constant (`LRSchedule`; the official retrieval recipes ramp over the whole run).
* Gradient accumulation over ``accumulation_steps`` micro-batches (each micro-batch its own contrastive loss),
  global-norm clipping at ``optim.grad_clip``, AMP (bf16, or fp16 with a ``GradScaler``) on CUDA and fp32 on the
  CPU, gradient checkpointing per ``model.grad_checkpointing``.

**Distributed.** Under torchrun (``WORLD_SIZE > 1``) the process group is initialised from the environment
(NCCL on GPUs, gloo on the CPU; several nodes need only torchrun's rendezvous flags) and the model is wrapped
in ``DistributedDataParallel``. The gradients are exactly those of one process holding the global batch:
`stanvid.losses.all_gather_with_grad` sums the slice gradients of the ranks' identical losses and DDP averages,
so two ranks give the same loss and weights as one (tests/test_train.py). The official code's ``GatherLayer``
instead hands each rank only its own loss's gradient, so its encoder gradients are ``1 / W`` of these on W
GPUs: its gradient clipping at 5 on 8 GPUs acts like clipping at ``5 x 8 = 40`` here. We keep the recipes'
value (5), which clips relative to the true full-batch gradient; set ``optim.grad_clip`` to ``5 * W`` to
reproduce the official clipping on W GPUs exactly.

**Checkpoints and resume.** Every ``checkpoint_every`` optimizer steps and at each epoch end, rank 0 writes
``out_dir/checkpoints/step-XXXXXXXX.pt`` (a temporary file, then ``os.replace``) with the model, the optimizer,
scheduler and scaler states, a linear head, the RNG states of every rank (python, numpy, torch, CUDA), the
data position (epoch and batches done in it), the recipe, the model config and the code version. Data order
is a function of ``(seed, epoch)`` (a seeded permutation, sharded per rank as ``DistributedSampler`` does),
and each item's random draws (frames, crop) come from a generator seeded by ``(seed, epoch, index)`` rather
than a per-worker stream, so ``resume=True`` skips exactly the batches already done and continues with the
same draws: an interrupted-then-resumed run reaches the same weights as an uninterrupted one, bit for bit on
the same machine (tests/test_train.py). Resuming needs the same recipe (apart from bookkeeping such as
``max_steps``, ``output_dir``, logging and evaluation settings) and the same number of processes.

**Logs.** A tqdm bar (rank 0) with loss, learning rate and videos/s; ``out_dir/log.jsonl``, one JSON object per
logged step and per evaluation; TensorBoard under ``out_dir/tensorboard`` when ``train.tensorboard`` is set
and the ``tensorboard`` package is installed; the final weights in ``out_dir/model`` (`stanvid.load_model`
reads them; a linear head is saved beside them as ``head.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from stanvid.checkpoint import (
    CHECKPOINT_FORMAT,
    code_version,
    latest_checkpoint,
    load_checkpoint,
    newest_readable_checkpoint,
    write_checkpoint,
)
from stanvid.data.base import format_skipped
from stanvid.data.loader import build_loader
from stanvid.distributed import default_device, launch_world_size, rank_world
from stanvid.errors import CheckpointError, ConfigError, DatasetError
from stanvid.fileio import atomic_write_bytes, atomic_write_text
from stanvid.heads import LinearHead, encode_class_names, eval_mode
from stanvid.losses import contrastive_loss, mug_contrastive_loss, recognition_loss, text_classifier_logits
from stanvid.precision import autocast
from stanvid.recipe import LEARNABLE, OptimRecipe, Recipe

__all__ = [
    "fit",
    "TrainResult",
    "Trainer",
    "LRSchedule",
    "param_groups",
    "setup_distributed",
    "effective_precision",
    "HEAD_FILE",
]

HEAD_FILE = "head.safetensors"
MAX_LOG_SCALE = math.log(100.0)  # CLIP clamps its learned logit scale at 100
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# recipe keys that may change between an interrupted run and its resumption: they do not change the weights
_RESUMABLE_CHANGES = (
    "name",
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.output_dir",
    "train.log_every",
    "train.tensorboard",
    "data.root",
    "data.num_workers",
    "data.test_annotations",
    "data.test_video_dir",
    "eval.",
)


# ---- distributed set-up --------------------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the default process group from torchrun's environment if needed.

    Under torchrun (``WORLD_SIZE > 1``) and no group yet: NCCL when CUDA is available (each process on GPU
    ``LOCAL_RANK``), gloo otherwise; ``env://`` rendezvous, so multi-node runs need nothing beyond torchrun's own
    ``--nnodes/--rdzv-*`` flags. An existing group (initialised by the caller) is used as it is.
    """
    if launch_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if torch.cuda.is_available():
            torch.cuda.set_device(default_device())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank_world()


# ---- optimizer and schedule ----------------------------------------------------------------------------------


def param_groups(model: nn.Module, optim: OptimRecipe, head: nn.Module | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: (CLIP | new) x (decayed | not), empty groups left out.

    "New" parameters are those `model.is_new_parameter(name)` names (STAN's branch, seqTransf) and a linear
    head's; they get ``lr * new_param_lr_mult``, as the official ``custom_keys={'STAN': dict(lr_mult=10.)}``.
    Weight decay follows ``optim.no_decay``:

    * ``clip_norm_bias`` (official, mmengine): CLIP's norm weights and biases and all of CLIP's biases are not
      decayed; the new parameters all are (a ``custom_keys`` match bypasses mmengine's norm/bias rules);
    * ``norm_bias``: no norm weight or bias anywhere is decayed;
    * ``none``: everything is decayed.

    The logit scale is never decayed (decaying a temperature has no meaning). Only parameters that require
    gradients are included. Each group carries ``names`` and ``kind`` (``"clip"`` or ``"new"``) for logging.
    """
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)
    }
    named = [(n, p, model.is_new_parameter(n)) for n, p in model.named_parameters() if p.requires_grad]
    if head is not None:
        norm_params |= {
            id(p) for m in head.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)
        }
        named += [(f"head.{n}", p, True) for n, p in head.named_parameters() if p.requires_grad]
    buckets: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param, new in named:
        norm_or_bias = id(param) in norm_params or name.rsplit(".", 1)[-1] == "bias"
        if name == "logit_scale":
            decay = False
        elif optim.no_decay == "none":
            decay = True
        elif optim.no_decay == "norm_bias":
            decay = not norm_or_bias
        else:  # clip_norm_bias
            decay = new or not norm_or_bias
        buckets.setdefault((new, decay), []).append((name, param))
    groups = []
    for new in (False, True):
        for decay in (True, False):
            items = buckets.get((new, decay))
            if not items:
                continue
            groups.append(
                {
                    "params": [p for _, p in items],
                    "names": [n for n, _ in items],
                    "kind": "new" if new else "clip",
                    "lr": optim.lr * (optim.new_param_lr_mult if new else 1.0),
                    "weight_decay": optim.weight_decay if decay else 0.0,
                }
            )
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return groups


@dataclass
class LRSchedule:
    """The learning-rate factor of an optimizer step (callable, for ``torch.optim.lr_scheduler.LambdaLR``).

    A linear ramp from ``start_factor`` to 1 over ``warmup_steps`` (mmengine ``LinearLR``, iteration based),
    then ``constant`` 1, or ``cosine``: ``min_ratio + (1 - min_ratio) (1 + cos(pi t / period)) / 2`` with ``t``
    the steps since the ramp ended, not clamped at ``period``, so a half period shorter than the steps left
    rises again (mmengine/torch ``CosineAnnealingLR``).
    """

    warmup_steps: int
    start_factor: float
    schedule: str
    period: int
    min_ratio: float
    hold_steps: int = 0  # at factor 1 between the ramp and the cosine (a gap between mmengine schedulers)

    @classmethod
    def from_recipe(cls, optim: OptimRecipe, epochs: int, steps_per_epoch: int) -> LRSchedule:
        warmup = round(optim.warmup_epochs * steps_per_epoch)
        cosine_epochs = (
            optim.cosine_epochs if optim.cosine_epochs is not None else epochs - optim.warmup_epochs
        )
        return cls(
            warmup_steps=warmup,
            start_factor=optim.warmup_start_factor,
            schedule=optim.schedule,
            period=round(cosine_epochs * steps_per_epoch),
            min_ratio=optim.min_lr_ratio,
            hold_steps=round(optim.hold_epochs * steps_per_epoch),
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        if self.schedule == "constant" or self.period <= 0 or step < self.warmup_steps + self.hold_steps:
            return 1.0
        t = step - self.warmup_steps - self.hold_steps
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * t / self.period)) / 2


class _Forward(nn.Module):
    """What DDP wraps: the encoders (and head) of one micro-batch, so DDP sees one ``forward`` per step."""

    def __init__(self, model: nn.Module, head: nn.Module | None, learnable: bool) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.learnable = learnable

    def forward(
        self, video: torch.Tensor, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Mug-STAN scores per-token text against per-frame video (stanvid.mug): nothing is pooled then
        mug = tokens is not None and self.model.config.similarity == "mug"
        video_emb = self.model.encode_video(video, pool=not mug)  # (B, D), or (B, T, D) for the Mug head
        scale = self.model.logit_scale.exp() if self.learnable else None
        if tokens is not None:
            return video_emb, self.model.encode_text(tokens, pool=not mug), scale  # (B, D) or (B, L, D)
        if self.head is not None:
            return self.head(video_emb), None, scale  # (B, K)
        return video_emb, None, scale


# ---- one process's training machinery ------------------------------------------------------------------------


class Trainer:
    """Model (DDP-wrapped under torchrun), optimizer, schedule, AMP scaler and classifier of one process.

    `fit` drives it; a benchmark can call `micro_step` / `optimizer_step` on its own batches. Batches are dicts:
    ``video`` float ``(B, T, 3, H, W)``, and ``tokens`` (or ``text``) LongTensor ``(B, L)`` for retrieval or
    ``label`` ``(B,)`` for recognition.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        *,
        steps_per_epoch: int,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.recipe = recipe
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world = rank_world()
        self.model = model.to(self.device)
        model.set_grad_checkpointing(recipe.model.grad_checkpointing)
        self.task = recipe.task
        self.learnable = recipe.train.temperature == LEARNABLE
        self.fixed_scale = None if self.learnable else 1.0 / float(recipe.train.temperature)
        model.logit_scale.requires_grad_(self.learnable)
        self.precision = effective_precision(recipe.train.precision, self.device)
        self.class_names = list(class_names) if class_names is not None else None
        self.class_features: torch.Tensor | None = None
        self.head: LinearHead | None = None
        if self.task == "recognition":
            if not self.class_names:
                raise ConfigError("recognition training needs the class names (class_names=...)")
            # the text tower only encodes the class names, once: frozen, as in the official recognizer
            for p in model.text.parameters():
                p.requires_grad_(False)
            self.class_features = encode_class_names(
                model, self.class_names, recipe.data.text_length, self.device
            )
            if recipe.model.classifier == "linear":
                scale = self.scale_value()
                self.head = LinearHead.from_class_features(self.class_features, scale).to(self.device)
                # the head's weights carry the scale from here on: a temperature would be unused (and DDP
                # refuses parameters that get no gradient)
                self.learnable, self.fixed_scale = False, scale
                model.logit_scale.requires_grad_(False)
        self.forward_module = _Forward(model, self.head, self.learnable)
        self.ddp: DistributedDataParallel | None = None
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.forward_module, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, recipe.optim, self.head),
            lr=recipe.optim.lr,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
            weight_decay=recipe.optim.weight_decay,
        )
        self.schedule = LRSchedule.from_recipe(recipe.optim, recipe.train.epochs, steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def scale_value(self) -> float:
        """The logit scale in use (``1 / tau``, or the learned ``exp(logit_scale)``)."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        return float(self.model.logit_scale.detach().exp())

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of one micro-batch (forward only)."""
        module = self.ddp if self.ddp is not None else self.forward_module
        video = batch["video"].to(self.device, non_blocking=True)  # (B, T, 3, H, W)
        with autocast(self.precision, self.device):
            if self.task == "retrieval":
                tokens = batch.get("tokens", batch.get("text"))
                if tokens is None:
                    raise DatasetError("retrieval batches need caption token ids under 'tokens' (or 'text')")
                tokens = tokens.to(self.device, non_blocking=True)
                video_emb, text_emb, scale = module(video, tokens)
                scale = scale if scale is not None else self.fixed_scale
                cfg = self.model.config
                if cfg.similarity == "mug":
                    return mug_contrastive_loss(
                        video_emb, text_emb, tokens != 0, scale, tau=cfg.mug_tau, mode=cfg.mug_mode
                    )
                return contrastive_loss(video_emb, text_emb, scale)
            if "label" not in batch:
                raise DatasetError("recognition batches need class indices under 'label'")
            out, _, scale = module(video, None)
            if self.head is None:
                out = text_classifier_logits(
                    out, self.class_features, scale if scale is not None else self.fixed_scale
                )
            labels = torch.as_tensor(batch["label"]).to(self.device, non_blocking=True)
            return recognition_loss(out, labels)

    def micro_step(self, batch: dict[str, Any], divisor: int = 1, sync: bool = True) -> float:
        """Forward and backward of one micro-batch, its loss divided by ``divisor`` (the micro-batches of this
        optimizer step); ``sync=False`` skips DDP's gradient all-reduce (all but the last micro-batch)."""
        sync_context = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with sync_context:
            loss = self.loss(batch)
            if not torch.isfinite(loss) and not self.scaler.is_enabled():
                raise FloatingPointError(f"the training loss is {loss.item()} (not finite)")
            self.scaler.scale(loss / divisor).backward()
        return float(loss.detach())

    def optimizer_step(self) -> dict[str, float]:
        """Unscale, clip (global L2 norm), step, update the scaler and the schedule; returns norm and lrs."""
        lrs = {g["kind"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step uses
        self.scaler.unscale_(self.optimizer)
        clip = self.recipe.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip is not None else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.learnable:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0.0, MAX_LOG_SCALE)
        return {"grad_norm": float(norm), "lr": lrs.get("clip", 0.0), "lr_new": lrs.get("new", 0.0)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "head": self.head.state_dict() if self.head is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("head") is None) != (self.head is None):
            raise CheckpointError(
                "the checkpoint's classifier (linear head or not) differs from the recipe's"
            )
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def effective_precision(precision: str, device: torch.device) -> str:
    """Mixed precision on CUDA only; the CPU trains in fp32 (bf16 autocast there is slow and untested)."""
    if device.type != "cuda":
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: bf16 is not supported on this GPU; use fp16 or fp32")
    return precision


# ---- data order that a resumed run can reproduce -------------------------------------------------------------


class _EpochSampler(Sampler):
    """This rank's share of the epoch's seeded permutation, from a start position, as ``(epoch, index)``.

    The permutation is ``DistributedSampler``'s (seed + epoch, sharded ``rank::world``, tail dropped), so it is
    a function of (seed, epoch, rank, world) alone; `set_position` skips the items already trained on.
    """

    def __init__(self, dataset: Dataset, world: int, rank: int, seed: int) -> None:
        self.inner = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    @property
    def items_per_epoch(self) -> int:
        return len(self.inner)

    def __len__(self) -> int:
        return max(len(self.inner) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, index in enumerate(self.inner):
            if i >= self.start:
                yield self.epoch, index


class _SeededItems(Dataset):
    """Serves ``(epoch, index)`` keys: item ``index`` of the dataset, its random draws seeded by (seed, epoch,
    index) through the dataset's ``set_epoch_seed`` hook (`stanvid.data.VideoClipDataset.set_epoch_seed`),
    so they do not depend on which worker decodes it nor on what that worker decoded before. A dataset
    without the hook is served as it is."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        set_epoch_seed = getattr(self.dataset, "set_epoch_seed", None)
        if set_epoch_seed is not None:
            set_epoch_seed(self.seed, epoch)  # this process's copy: the key's epoch, in a worker or not
        return self.dataset[index]


# ---- RNG states ----------------------------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The process's RNG states in types ``torch.load(weights_only=True)`` reads back."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Whatever runs inside (an evaluation) leaves the training RNG streams as they were."""
    state = _rng_state(device)
    try:
        yield
    finally:
        _set_rng_state(state, device)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _check_resumable(saved: dict[str, Any], recipe: Recipe, world: int, path: Path) -> None:
    old, new = _flatten(saved["recipe"]), _flatten(recipe.to_dict())
    changed = [
        key
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in _RESUMABLE_CHANGES)
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


class _RunLog:
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
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace(".", "/"), value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- the loop ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `fit` did: optimizer ``steps`` in total (a resumed run counts from the start), ``epochs`` completed,
    wall ``seconds`` of this call, the ``last_loss``, the ``history`` of logged steps and evaluations (also of
    the run before a resume), the last ``checkpoint`` written and the ``model_dir`` of the final weights."""

    steps: int
    epochs: int
    seconds: float
    last_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    model_dir: Path | None = None


@dataclass
class _Data:
    """The training data of this rank: order a function of (seed, epoch), items' draws of (seed, epoch, index)."""

    sampler: _EpochSampler
    generator: (
        torch.Generator
    )  # the loader's: re-seeded per (epoch, start) so workers' seeds repeat on resume
    loader: DataLoader
    batches_per_epoch: int


@dataclass
class _Run:
    """The state `fit`'s steps share: what runs (model, trainer, data), where it is, and what it has logged."""

    model: nn.Module
    recipe: Recipe
    trainer: Trainer
    data: _Data
    rank: int
    world: int
    device: torch.device
    out: Path | None
    stop_at: int  # the optimizer step to stop after
    epoch: int = 0  # position: epochs done, batches done in the current one, optimizer steps done
    batch_in_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # the last checkpoint written (or resumed from)
    last_loss: float | None = None
    skipped: list[Any] = field(default_factory=list)
    log: _RunLog | None = None
    bar: Any = None  # tqdm, rank 0 with progress
    window_losses: list[float] = field(default_factory=list)  # since the last log record
    window_videos: int = 0
    window_start: float = field(default_factory=time.perf_counter)


def fit(
    model: nn.Module,
    train_set: Dataset,
    recipe: Recipe,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    class_names: Sequence[str] | None = None,
    eval_fn: Callable[[nn.Module, int, nn.Module | None], dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_set`` as ``recipe`` says (see the module docstring).

    Args:
        model: a `stanvid.VideoCLIP` (any temporal module); left in eval mode on ``device`` at the end.
        train_set: a map-style dataset of dicts, ``{"video": (T, 3, S, S), "tokens" (or "text"): (L,)}`` for
            retrieval, ``{"video", "label": int}`` for recognition (`stanvid.data` datasets yield these).
            A dataset with a ``set_epoch_seed(seed, epoch)`` method (`stanvid.data.VideoClipDataset`) draws
            each item's frames and crop from (seed, epoch, index), which makes resumed runs exact.
        recipe: the run; ``recipe.train.batch_size`` is per process.
        out_dir: checkpoints, ``log.jsonl``, ``recipe.yaml`` and the final ``model/``; None writes nothing.
        resume: continue from the newest checkpoint in ``out_dir`` (a fresh start when there is none). Without
            it, an ``out_dir`` that already holds checkpoints is refused rather than overwritten.
        progress: show the tqdm bar (rank 0).
        collate_fn: batch collation; default `stanvid.data.collate_skipping` (drops videos that failed to
            decode with ``on_error="skip"`` and reports them at the end).
        class_names: recognition class names; default ``train_set.annotations.classes``.
        eval_fn: ``(model, epoch, head) -> metrics`` (``head``: the linear head or None) run on every rank
            every ``train.eval_every`` epochs (and after the last); its metrics are logged. The training RNG
            streams are preserved around it.
        device: default `default_device()`.
    """
    started = time.perf_counter()
    rank, world = setup_distributed()
    device = torch.device(device) if device is not None else default_device()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ConfigError("resume=True needs out_dir (where the checkpoints are)")
    data = _build_data(train_set, recipe, rank, world, device, collate_fn)
    steps_per_epoch = math.ceil(data.batches_per_epoch / recipe.optim.accumulation_steps)
    total_steps = steps_per_epoch * recipe.train.epochs
    max_steps = recipe.train.max_steps
    if class_names is None and recipe.task == "recognition":
        class_names = getattr(getattr(train_set, "annotations", None), "classes", None)
    trainer = Trainer(model, recipe, steps_per_epoch=steps_per_epoch, class_names=class_names, device=device)
    stop_at = min(total_steps, max_steps) if max_steps is not None else total_steps
    run = _Run(model, recipe, trainer, data, rank, world, device, out, stop_at)
    resumed = _resume_or_seed(run, resume)
    _announce(run, resume, resumed)
    run.log = _RunLog(out, rank == 0, recipe.train.tensorboard, run.step if resumed else None)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.stop_at, initial=min(run.step, run.stop_at), unit="step", dynamic_ncols=True)
    model.train()
    run.window_start = time.perf_counter()
    try:
        _train_epochs(run, eval_fn)
    finally:
        if run.bar is not None:
            run.bar.close()
        run.log.close()
    model.eval()
    model_dir = _save_final(run)
    if run.skipped and rank == 0:
        print(format_skipped(run.skipped), file=sys.stderr)
    if world > 1:
        dist.barrier()
    return TrainResult(
        steps=run.step,
        epochs=run.epoch,
        seconds=time.perf_counter() - started,
        last_loss=run.last_loss,
        history=run.history,
        checkpoint=run.checkpoint,
        model_dir=model_dir,
    )


def _build_data(
    train_set: Dataset,
    recipe: Recipe,
    rank: int,
    world: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> _Data:
    """This rank's sampler and loader; refuses a batch larger than this rank's share of the data."""
    tr = recipe.train
    sampler = _EpochSampler(train_set, world, rank, tr.seed)
    batches_per_epoch = sampler.items_per_epoch // tr.batch_size
    if batches_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size {tr.batch_size} x {world} process(es) exceeds the {len(train_set)} training items"
        )
    generator = torch.Generator()  # reseeded per (epoch, start) by `_train_epochs`
    loader = build_loader(
        _SeededItems(train_set, tr.seed),
        tr.batch_size,
        sampler=sampler,
        num_workers=recipe.data.num_workers,
        pin_memory=device.type == "cuda",
        seed=generator,
        drop_last=True,
        collate_fn=collate_fn,
    )
    return _Data(sampler, generator, loader, batches_per_epoch)


def _choose_checkpoint(out: Path | None, resume: bool, rank: int, world: int) -> tuple[Path | None, Any]:
    """The checkpoint to resume from (and its state, when this rank read it), the same on every rank.

    Rank 0 decides (the newest that reads, when resuming) and broadcasts the path; the other ranks read that
    file themselves (several nodes: ``out_dir`` on a shared filesystem). Without ``resume``, a folder that
    already holds checkpoints is refused.
    """
    checkpoint, saved = None, None
    if out is not None and rank == 0:
        checkpoint, saved = newest_readable_checkpoint(out) if resume else (latest_checkpoint(out), None)
    if world > 1:
        chosen = [checkpoint]
        dist.broadcast_object_list(chosen, src=0)
        checkpoint = chosen[0]
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"{out} already holds checkpoints ({checkpoint.name}); resume (--resume) or choose another output folder"
        )
    if checkpoint is not None and saved is None:  # other ranks, or none reads: raises naming the file
        saved = load_checkpoint(checkpoint)
    return checkpoint, saved


def _resume_or_seed(run: _Run, resume: bool) -> bool:
    """Restore the run from its checkpoint (model, trainer, position, history, this rank's RNG streams) when
    resuming from one, else seed this rank's RNG streams; returns whether it resumed."""
    checkpoint, saved = _choose_checkpoint(run.out, resume, run.rank, run.world)
    if checkpoint is None:
        _seed_all(run.recipe.train.seed + run.rank)
        return False
    _check_resumable(saved, run.recipe, run.world, checkpoint)
    run.model.load_state_dict(saved["model"])
    run.trainer.load_state_dict(saved["trainer"])
    run.epoch, run.batch_in_epoch, run.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
    run.history = list(saved.get("history", []))
    _set_rng_state(saved["rng"][run.rank], run.device)
    run.checkpoint = checkpoint
    return True


def _announce(run: _Run, resume: bool, resumed: bool) -> None:
    """Rank 0: say what is not as asked (a fresh start on --resume, fp32 on the CPU); write recipe.yaml."""
    if run.rank != 0:
        return
    recipe = run.recipe
    if resume and not resumed and run.out is not None:
        print(f"no checkpoint in {run.out}: starting from scratch", file=sys.stderr)
    if run.out is not None:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "recipe.yaml", recipe.to_yaml())
    if run.trainer.precision != recipe.train.precision:
        print(
            f"train.precision {recipe.train.precision} needs CUDA: training in fp32 on {run.device}",
            file=sys.stderr,
        )


def _train_epochs(run: _Run, eval_fn: Callable[..., dict[str, Any]] | None) -> None:
    """Epochs from the run's position until the last epoch or ``stop_at``; each ends with `_end_epoch`."""
    tr = run.recipe.train
    stopped = run.step >= run.stop_at
    while run.epoch < tr.epochs and not stopped:
        data = run.data
        data.sampler.set_position(run.epoch, run.batch_in_epoch * tr.batch_size)
        data.generator.manual_seed((tr.seed * 1_000_003 + run.epoch) * 1_000_003 + run.batch_in_epoch)
        if run.bar is not None:
            run.bar.set_description(f"epoch {run.epoch + 1}/{tr.epochs}")
        if _train_batches(run):
            break
        _end_epoch(run, eval_fn)
        if run.step >= run.stop_at:
            break


def _train_batches(run: _Run) -> bool:
    """The rest of the current epoch's batches, an optimizer step after every ``accumulation_steps`` of them
    (fewer at the epoch's end); returns True when ``stop_at`` was reached inside the epoch."""
    accum, per_epoch = run.recipe.optim.accumulation_steps, run.data.batches_per_epoch
    step_losses: list[float] = []
    for batch in run.data.loader:
        _take_skipped(run, batch)
        group_start = (run.batch_in_epoch // accum) * accum
        group_size = min(accum, per_epoch - group_start)
        last_micro = run.batch_in_epoch == group_start + group_size - 1
        step_losses.append(run.trainer.micro_step(batch, divisor=group_size, sync=last_micro))
        run.window_videos += len(batch["video"])
        run.batch_in_epoch += 1
        if not last_micro:
            continue
        _optimizer_step(run, step_losses)
        step_losses = []
        final = run.step >= run.stop_at
        epoch_done = run.batch_in_epoch == per_epoch  # the epoch end writes its own checkpoint
        every = run.recipe.train.checkpoint_every
        if not epoch_done and (final or (every and run.step % every == 0)):
            run.checkpoint = _save(run, run.epoch, run.batch_in_epoch) or run.checkpoint
        if final:
            return not epoch_done
    return False


def _take_skipped(run: _Run, batch: Any) -> None:
    """Move a batch's skipped-video records to the run's list; a batch with no video left is an error."""
    if isinstance(batch, dict) and "skipped" in batch:
        run.skipped.extend(batch.pop("skipped"))
        if "video" not in batch:
            size = run.recipe.train.batch_size
            raise DatasetError(
                f"every video of a training batch failed to decode:\n{format_skipped(run.skipped[-size:])}"
            )


def _optimizer_step(run: _Run, step_losses: list[float]) -> None:
    """Step the optimizer on the accumulated gradients; log every ``log_every`` steps and at the last."""
    info = run.trainer.optimizer_step()
    run.step += 1
    run.last_loss = sum(step_losses) / len(step_losses)
    run.window_losses.append(run.last_loss)
    if run.step % run.recipe.train.log_every == 0 or run.step >= run.stop_at:
        record = _log_record(
            run.trainer,
            run.step,
            run.epoch,
            run.batch_in_epoch / run.data.batches_per_epoch,
            run.window_losses,
            run.window_videos * run.world,
            time.perf_counter() - run.window_start,
            info,
        )
        _record(run, record)
        if run.bar is not None:
            run.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", vid_s=f"{record['videos_per_s']:.1f}"
            )
        run.window_losses, run.window_videos, run.window_start = [], 0, time.perf_counter()
    if run.bar is not None:
        run.bar.update(1)


def _record(run: _Run, record: dict[str, Any]) -> None:
    run.history.append(record)
    assert run.log is not None
    run.log.write(record)


def _end_epoch(run: _Run, eval_fn: Callable[..., dict[str, Any]] | None) -> None:
    """Close an epoch: evaluate (every ``eval_every`` epochs, and after the last), then checkpoint."""
    tr = run.recipe.train
    run.epoch += 1
    run.batch_in_epoch = 0
    last_epoch = run.epoch == tr.epochs or run.step >= run.stop_at
    if eval_fn is not None and ((tr.eval_every and run.epoch % tr.eval_every == 0) or last_epoch):
        with _rng_preserved(run.device), eval_mode(run.model, run.trainer.head):
            metrics = eval_fn(run.model, run.epoch, run.trainer.head)
        _record(run, {"step": run.step, "epoch": run.epoch, "eval": metrics})
    run.checkpoint = _save(run, run.epoch, 0) or run.checkpoint


def _save(run: _Run, position_epoch: int, position_batch: int) -> Path | None:
    """Checkpoint the run at this data position (rank 0 writes; every rank contributes its RNG states).

    Returns the path written on rank 0, None elsewhere or without ``out_dir``."""
    if run.out is None:
        return None
    states = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(states, _rng_state(run.device))
    else:
        states = [_rng_state(run.device)]
    if run.rank != 0:
        return None
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "trainer": run.trainer.state_dict(),
        "rng": states,
        "epoch": position_epoch,
        "batch_in_epoch": position_batch,
        "step": run.step,
        "world_size": run.world,
        "history": run.history,
        "recipe": run.recipe.to_dict(),
        "model_config": run.model.config.to_dict(),
        "version": code_version(),
    }
    return write_checkpoint(state, run.out, run.step, run.recipe.train.keep_checkpoints)


def _save_final(run: _Run) -> Path | None:
    """Rank 0: the final weights in ``out_dir/model`` (`stanvid.load_model` reads them), a linear head beside
    them as `HEAD_FILE`; returns that folder (None elsewhere or without ``out_dir``)."""
    if run.rank != 0 or run.out is None:
        return None
    model_dir = run.out / "model"
    run.model.save_pretrained(model_dir)
    head = run.trainer.head
    if head is not None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        atomic_write_bytes(model_dir / HEAD_FILE, save(tensors))
    return model_dir


def _log_record(
    trainer: Trainer,
    step: int,
    epoch: int,
    epoch_fraction: float,
    losses: list[float],
    videos: int,
    seconds: float,
    info: dict[str, float],
) -> dict[str, Any]:
    loss, mean = losses[-1], sum(losses) / len(losses)
    if trainer.task == "recognition" and trainer.world > 1:
        # the recognition loss is per rank (the contrastive loss is already global): average it for the log
        both = torch.tensor([loss, mean], dtype=torch.float64, device=trainer.device)
        dist.all_reduce(both)
        loss, mean = (both / trainer.world).tolist()
    return {
        "step": step,
        "epoch": round(epoch + epoch_fraction, 4),
        "loss": loss,
        "loss_avg": mean,
        "lr": info["lr"],
        "lr_new": info["lr_new"],
        "grad_norm": info["grad_norm"],
        "logit_scale": trainer.scale_value(),
        "videos_per_s": videos / max(seconds, 1e-9),
    }
