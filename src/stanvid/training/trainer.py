"""One process's training machinery: the optimizer's parameter groups, the learning-rate schedule, the module
DDP wraps, and `Trainer` (micro-steps, optimizer steps, AMP scaler, the recognition classifier).

`stanvid.training.loop.fit` drives a `Trainer` over the data; a benchmark can drive one on its own batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stanvid.distributed import default_device, launch_world_size, rank_world
from stanvid.errors import CheckpointError, ConfigError, DatasetError
from stanvid.models.heads import LinearHead, encode_class_names
from stanvid.precision import autocast
from stanvid.training.losses import (
    contrastive_loss,
    mug_contrastive_loss,
    recognition_loss,
    text_classifier_logits,
)
from stanvid.training.recipe import LEARNABLE, OptimRecipe, Recipe

__all__ = ["Trainer", "LRSchedule", "param_groups", "setup_distributed", "effective_precision"]

MAX_LOG_SCALE = math.log(100.0)  # CLIP clamps its learned logit scale at 100
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


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
        # Mug-STAN scores per-token text against per-frame video (stanvid.models.mug): nothing is pooled then
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
