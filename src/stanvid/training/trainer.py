"""One process's training machinery: the optimizer's parameter groups, the learning-rate schedule, the module
DDP wraps, and `Trainer` (micro-steps, exact accumulation, optimizer steps, AMP scaler, the recognition
classifier).

`stanvid.training.loop.fit` drives a `Trainer` over the data; a benchmark can drive one on its own batches.

**Exact accumulation** (`Trainer.accumulate_exact`; GradCache, Gao et al. 2021). A contrastive loss scores
every caption against every video of the batch, so k micro-batches that each take their own loss (and
average the gradients) are not one step over the k-times larger batch. Instead:

1. a forward pass over each micro-batch *without* autograd, keeping only its embeddings (for the Mug head,
   the per-frame video and per-token text features) and the RNG state it started from (drop-path does not draw
   from it: its masks are keyed on (seed, step, each sample's index in the global batch), `drop_path_keys`, so
   micro-batches, ranks and one big batch drop the same rows);
2. the loss over the whole cached batch (gathered over all ranks, as for a single micro-batch) and its
   gradient with respect to the cached embeddings and the logit scale;
3. per micro-batch, the RNG state restored (anything drawn from the generators is drawn again), a forward
   pass *with* autograd and a backward pass from its slice of the cached gradient into the weights (DDP's
   all-reduce on the last one only; the logit scale's gradient is fed once, there).

By the chain rule the weights' gradients are those of one pass over the whole batch; memory holds one
micro-batch's activations plus the embeddings; the cost is one extra forward pass per micro-batch. A second
pass whose embeddings do not match the first (randomness in the model that the CPU/CUDA generators do not
drive) is refused with an error rather than giving wrong gradients.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stanvid.distributed import default_device, launch_world_size, rank_world
from stanvid.errors import CheckpointError, ConfigError, DatasetError, NonFiniteLossError
from stanvid.models.heads import LinearHead, encode_class_names
from stanvid.models.stan import SampleKeys, sample_keys
from stanvid.precision import autocast, cpu_has_native_bf16, cpu_has_native_fp16
from stanvid.training.losses import (
    contrastive_loss,
    mug_contrastive_loss,
    recognition_loss,
    sigmoid_loss,
    text_classifier_logits,
)
from stanvid.training.recipe import LEARNABLE, OptimRecipe, Recipe
from stanvid.training.state import set_torch_rng_state, torch_rng_state

__all__ = [
    "Trainer",
    "LRSchedule",
    "param_groups",
    "setup_distributed",
    "effective_precision",
    "precision_note",
]

MAX_LOG_SCALE = math.log(100.0)  # CLIP clamps its learned logit scale at 100 (SigLIP does not clamp)
# SigLIP's initial logit bias, given to a model that has none (a CLIP model) under the sigmoid loss
SIGLIP_BIAS_INIT = -10.0
# How far a micro-batch's second forward pass may differ from its first (largest difference over the largest
# magnitude) before exact accumulation refuses: kernels may round differently with autograd on, a redrawn
# drop-path mask changes whole rows
REPLAY_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


# ---- distributed set-up --------------------------------------------------------------------------------------


def setup_distributed(timeout_minutes: float | None = None) -> tuple[int, int]:
    """``(rank, world_size)``, initialising the default process group from torchrun's environment if needed.

    Under torchrun (``WORLD_SIZE > 1``) and no group yet: NCCL when CUDA is available (each process on GPU
    ``LOCAL_RANK``), gloo otherwise; ``env://`` rendezvous, so multi-node runs need nothing beyond torchrun's own
    ``--nnodes/--rdzv-*`` flags. ``timeout_minutes`` (``train.dist_timeout_minutes``) bounds how long a
    collective waits for the other ranks before failing (torch's default otherwise). An existing group
    (initialised by the caller) is used as it is, timeout included.
    """
    if launch_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        extra = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if torch.cuda.is_available():
            torch.cuda.set_device(default_device())
            dist.init_process_group("nccl", **extra)
        else:
            dist.init_process_group("gloo", **extra)
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

    The logit scale and the sigmoid loss's bias are never decayed (decaying a temperature has no meaning). Only
    parameters that require gradients are included. Each group carries ``names`` and ``kind`` (``"clip"`` or ``"new"``) for logging.
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
        if name in ("logit_scale", "logit_bias"):
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

    def __init__(
        self, model: nn.Module, head: nn.Module | None, learnable: bool, sigmoid: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.learnable = learnable
        self.sigmoid = sigmoid

    def forward(self, video: torch.Tensor, tokens: torch.Tensor | None) -> tuple:
        """``(video, text or None, learned scale or None, sigmoid loss's bias or None)``: the scale and bias
        pass through here so that DDP sees them used."""
        # Mug-STAN scores per-token text against per-frame video (stanvid.models.mug): nothing is pooled then
        mug = tokens is not None and self.model.config.similarity == "mug"
        video_emb = self.model.encode_video(video, pool=not mug)  # (B, D), or (B, T, D) for the Mug head
        scale = self.model.logit_scale.exp() if self.learnable else None
        bias = self.model.logit_bias.reshape(()) if self.sigmoid else None
        if tokens is not None:
            return video_emb, self.model.encode_text(tokens, pool=not mug), scale, bias  # (B, D) or (B, L, D)
        if self.head is not None:
            return self.head(video_emb), None, scale, bias  # (B, K)
        return video_emb, None, scale, bias


# ---- one process's training machinery ------------------------------------------------------------------------


class Trainer:
    """Model (DDP-wrapped under torchrun), optimizer, schedule, AMP scaler and classifier of one process.

    `fit` drives it; a benchmark can call `micro_step` (or `accumulate_exact` with a step's micro-batches)
    and `optimizer_step` on its own batches. ``precision`` is what this device trains ``train.precision`` in
    (`effective_precision`); ``exact``, whether accumulated micro-batches form one contrastive batch. Batches
    are dicts: ``video`` float ``(B, T, 3, H, W)``, and ``tokens`` (or ``text``) LongTensor ``(B, L)`` for
    retrieval or ``label`` ``(B,)`` for recognition.
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
        # SigLIP's sigmoid loss learns a bias: the model's (a SigLIP checkpoint's), or a new one; frozen otherwise
        self.sigmoid = self.task == "retrieval" and recipe.train.loss == "sigmoid"
        if self.sigmoid:
            model.add_logit_bias(SIGLIP_BIAS_INIT).requires_grad_(True)
        elif getattr(model, "logit_bias", None) is not None:
            model.logit_bias.requires_grad_(False)
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
        self.forward_module = _Forward(model, self.head, self.learnable, self.sigmoid)
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

        # retrieval with several micro-batches per step: one contrastive problem over all of them
        self.exact = self.task == "retrieval" and recipe.optim.accumulation == "exact"
        if self.exact and recipe.optim.accumulation_steps > 1 and self.device.type not in ("cpu", "cuda"):
            raise ConfigError(
                f"optim.accumulation: exact replays each micro-batch's random draws (drop-path) from the CPU "
                f"and CUDA generators, which {self.device.type} does not use; set optim.accumulation: "
                "independent or optim.accumulation_steps: 1"
            )
        self.skipped_steps = 0  # optimizer steps the fp16 loss scaler skipped (non-finite gradients)
        self.step_samples = 0  # samples this rank has forwarded in the current optimizer step so far

    def scale_value(self) -> float:
        """The logit scale in use (``1 / tau``, or the learned ``exp(logit_scale)``)."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        return float(self.model.logit_scale.detach().exp())

    # ---- inputs, outputs, losses -----------------------------------------------------------------------

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(video, tokens, labels)`` of a batch as they are (on the host, for a loader's batch)."""
        video = batch["video"]  # (B, T, 3, H, W)
        if self.task == "retrieval":
            tokens = batch.get("tokens", batch.get("text"))
            if tokens is None:
                raise DatasetError("retrieval batches need caption token ids under 'tokens' (or 'text')")
            return video, tokens, None  # tokens (B, L)
        if "label" not in batch:
            raise DatasetError("recognition batches need class indices under 'label'")
        return video, None, torch.as_tensor(batch["label"])  # labels (B,)

    def drop_path_keys(self, offset: int, count: int) -> SampleKeys:
        """The drop-path keys of ``count`` samples that start ``offset`` samples into this rank's share of the
        current optimizer step: (``train.seed``, the step, each sample's index in the step's global batch).

        The index interleaves the ranks, ``local position x world + rank``, as the data does (`EpochSampler`
        and the shard readers deal the global order out ``rank::world``), so a sample has the same index, and
        draws the same masks, on 1 GPU with the whole batch as on 8 with micro-batches."""
        local = torch.arange(offset, offset + count, device=self.device)
        return SampleKeys(self.recipe.train.seed, self.steps_taken, local * self.world + self.rank)

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken so far (the schedule's count, restored on resume)."""
        return int(self.scheduler.last_epoch)

    def _forward(
        self, module: nn.Module, video: torch.Tensor, tokens: torch.Tensor | None, offset: int = 0
    ) -> tuple:
        """The encoders on one micro-batch, moved to the device, under the run's autocast, its drop-path keyed
        on its samples (`drop_path_keys`; ``offset``: the samples of this step before it on this rank)."""
        video = video.to(self.device, non_blocking=True)
        tokens = tokens.to(self.device, non_blocking=True) if tokens is not None else None
        with autocast(self.precision, self.device), sample_keys(self.drop_path_keys(offset, video.shape[0])):
            return module(video, tokens)

    def _loss_of(
        self, outputs: tuple, tokens: torch.Tensor | None, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss of encoder outputs ``(video, text or None, learned scale or None, bias or None)``. No
        autocast here: every loss (`stanvid.training.losses`) computes in float32 with autocast off itself."""
        video_emb, text_emb, scale, bias = outputs
        scale = scale if scale is not None else self.fixed_scale
        if self.task == "retrieval":
            assert tokens is not None
            cfg = self.model.config
            if cfg.similarity == "mug":
                mask = tokens.to(self.device) != 0  # (B, L)
                return mug_contrastive_loss(
                    video_emb, text_emb, mask, scale, tau=cfg.mug_tau, mode=cfg.mug_mode
                )
            if self.sigmoid:
                return sigmoid_loss(video_emb, text_emb, scale, bias)
            return contrastive_loss(video_emb, text_emb, scale)
        if self.head is None:
            video_emb = text_classifier_logits(video_emb, self.class_features, scale)
        assert labels is not None
        return recognition_loss(video_emb, labels.to(self.device, non_blocking=True))

    def _loss_value(self, loss: torch.Tensor) -> float:
        """The value of a loss about to be backpropagated, read from the device once. A non-finite one stops the
        run here, before any weight changes, except in fp16, where the loss scaler skips that step."""
        value = float(loss.detach())
        if not self.scaler.is_enabled() and not math.isfinite(value):
            raise NonFiniteLossError(
                f"the training loss is {value} (not finite) at train.precision {self.precision}"
            )
        return value

    def loss(self, batch: dict[str, Any], offset: int = 0) -> torch.Tensor:
        """The loss of one micro-batch (forward only), ``offset`` samples into the step on this rank."""
        video, tokens, labels = self._inputs(batch)
        return self._loss_of(self._forward(self._train_module, video, tokens, offset), tokens, labels)

    @property
    def _train_module(self) -> nn.Module:
        """What a forward pass that backpropagates goes through: DDP under torchrun, else `_Forward` itself."""
        return self.ddp if self.ddp is not None else self.forward_module

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around a backward pass: DDP's ``no_sync`` (no gradient all-reduce) unless ``sync``; nothing on one
        process."""
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()

    # ---- steps -------------------------------------------------------------------------------------------

    def micro_step(self, batch: dict[str, Any], divisor: int = 1, sync: bool = True) -> float:
        """Forward and backward of one micro-batch, its loss divided by ``divisor`` (the micro-batches of this
        optimizer step); ``sync=False`` skips DDP's gradient all-reduce (all but the last micro-batch).

        Micro-batches stepped this way are independent: each is its own contrastive problem (see
        `accumulate_exact` for one problem over all of them)."""
        with self._gradient_sync(sync):
            loss = self.loss(batch, self.step_samples)
            value = self._loss_value(loss)
            self.scaler.scale(loss / divisor).backward()
        self.step_samples += len(batch["video"])
        return value

    def accumulate_exact(self, batches: Sequence[dict[str, Any]]) -> float:
        """Forward and backward of the micro-batches of one optimizer step as one contrastive batch (the module
        docstring says how): afterwards the gradients are those of a single step on all of ``batches`` (of all
        ranks), at the memory of one micro-batch plus the embeddings. Returns the loss of that whole batch.

        Retrieval only (recognition's per-video loss is exact with `micro_step`). The batches stay where they
        are (the host, for a loader's) and are moved to the device once per pass."""
        if self.task != "retrieval":
            raise ConfigError("exact accumulation is for the contrastive loss of retrieval; use micro_step")
        if len(batches) == 0:
            raise ValueError("accumulate_exact needs at least one micro-batch")
        if len(batches) == 1:
            return self.micro_step(batches[0])
        inputs = [self._inputs(b)[:2] for b in batches]
        cached, states = self._cache_features(inputs)
        loss, grads = self._cached_loss_grads(cached, [tokens for _, tokens in inputs])
        self._backward_from_cache(inputs, states, cached, grads)
        return loss

    def _cache_features(self, inputs: list[tuple]) -> tuple[list[tuple], list[tuple]]:
        """Pass 1: each micro-batch's embeddings without autograd, and the RNG states each started from."""
        cached, states, offset = [], [], self.step_samples
        with torch.no_grad():
            for video, tokens in inputs:
                states.append(torch_rng_state(self.device))
                video_emb, text_emb, *_ = self._forward(self.forward_module, video, tokens, offset)
                cached.append((video_emb, text_emb))  # (b, D) each, or (b, T, D) and (b, L, D) for Mug
                offset += video.shape[0]
        return cached, states

    def _cached_loss_grads(
        self, cached: list[tuple], tokens: list[torch.Tensor]
    ) -> tuple[float, dict[str, torch.Tensor | None]]:
        """Pass 2: the loss of the whole cached batch and its (scaled) gradient with respect to the video and
        text embeddings and, when learned, the logit scale and the sigmoid loss's bias."""
        leaves = {
            "video": torch.cat([v for v, _ in cached]).requires_grad_(),  # (k*b, ...)
            "text": torch.cat([t for _, t in cached]).requires_grad_(),
            "scale": self.model.logit_scale.detach().exp().requires_grad_() if self.learnable else None,
            "bias": self.model.logit_bias.detach().reshape(()).requires_grad_() if self.sigmoid else None,
        }
        loss = self._loss_of(tuple(leaves.values()), torch.cat(tokens), None)
        value = self._loss_value(loss)
        names = [name for name, leaf in leaves.items() if leaf is not None]
        grads = torch.autograd.grad(self.scaler.scale(loss), [leaves[name] for name in names])
        found = dict(zip(names, grads, strict=True))
        return value, {name: found.get(name) for name in leaves}  # None for what is not learned

    def _backward_from_cache(
        self, inputs: list[tuple], states: list[tuple], cached: list[tuple], grads: dict
    ) -> None:
        """Pass 3: per micro-batch, its RNG state restored, a forward pass with autograd (through DDP, synced on
        the last micro-batch only) and a backward pass from its slice of the cached gradients."""
        video_grad, text_grad = grads["video"], grads["text"]
        offset, last, start = 0, len(inputs) - 1, self.step_samples
        for j, (video, tokens) in enumerate(inputs):
            n = video.shape[0]
            set_torch_rng_state(states[j], self.device)
            with self._gradient_sync(j == last):
                video_emb, text_emb, scale, bias = self._forward(
                    self._train_module, video, tokens, start + offset
                )
                self._check_replay(j, (video_emb, text_emb), cached[j])
                outputs = [video_emb, text_emb]
                out_grads = [video_grad[offset : offset + n], text_grad[offset : offset + n]]
                for out, name in ((scale, "scale"), (bias, "bias")):
                    if out is not None and j == last:  # the logit scale's and bias's gradients, once per step
                        outputs.append(out)
                        out_grads.append(grads[name])
                pairs = [(o, g) for o, g in zip(outputs, out_grads, strict=True) if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            offset += n
        self.step_samples = start + offset

    def _check_replay(self, j: int, new: tuple, old: tuple) -> None:
        tolerance = REPLAY_TOLERANCE[self.precision]
        rows = []  # per embedding: largest difference, largest magnitude, whether the first pass is finite
        for a, b in zip(new, old, strict=True):
            a, b = a.detach().float(), b.float()
            rows.append(torch.stack([(a - b).abs().max(), b.abs().max(), torch.isfinite(b).all().float()]))
        measured = torch.stack(rows).tolist()  # (2, 3), read from the device at once
        for name, (difference, magnitude, finite) in zip(("video", "text"), measured, strict=True):
            gap = difference / max(magnitude, 1e-12)
            if not gap <= tolerance and bool(finite):
                raise ConfigError(
                    f"optim.accumulation: exact: the second forward pass of micro-batch {j + 1} gave other "
                    f"{name} embeddings than the first (relative difference {gap:.2g} > {tolerance:g}): "
                    "something random in the model's forward pass is not drawn from the torch CPU/CUDA "
                    "generators and cannot be replayed; make it so, put the model in eval mode for those "
                    "modules, or set optim.accumulation: independent"
                )

    def optimizer_step(self) -> dict[str, float]:
        """Unscale, clip (global L2 norm), step, update the scaler and the schedule; returns norm and lrs (and,
        with the fp16 loss scaler, the scale and whether it skipped this step for non-finite gradients)."""
        lrs = {g["kind"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step uses
        self.scaler.unscale_(self.optimizer)
        clip = self.recipe.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip is not None else float("inf"))
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # the scaler lowers its scale exactly when it found inf/NaN gradients and skipped the step
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.skipped_steps += int(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_samples = 0
        with _schedule_without_optimizer_step() if skipped else contextlib.nullcontext():
            self.scheduler.step()
        if (
            self.learnable and not self.sigmoid
        ):  # CLIP's clamp; SigLIP's scale is free (its checkpoints pass 100)
            with torch.no_grad():
                self.model.logit_scale.clamp_(0.0, MAX_LOG_SCALE)
        info = {"grad_norm": float(norm), "lr": lrs.get("clip", 0.0), "lr_new": lrs.get("new", 0.0)}
        if self.scaler.is_enabled():
            info.update(loss_scale=self.scaler.get_scale(), skipped=float(skipped))
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "head": self.head.state_dict() if self.head is not None else None,
            "skipped_steps": self.skipped_steps,
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
        self.skipped_steps = int(state.get("skipped_steps", 0))


@contextlib.contextmanager
def _schedule_without_optimizer_step() -> Iterator[None]:
    """Silence torch's warning that the schedule stepped before the optimizer ever did: it comes when the fp16
    loss scaler skipped a scheduler's first step, which is no misuse. Entered only for a skipped step, since
    `warnings.catch_warnings` resets which warnings were already shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
        yield


# ---- precision -----------------------------------------------------------------------------------------------


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision training runs in on ``device`` for ``train.precision``.

    CUDA: as asked (bf16 refused on a GPU without it). CPU: fp16 as asked (autocast and the loss scaler, as on
    CUDA); bf16 where the CPU computes it natively (`stanvid.precision.cpu_has_native_bf16`), else fp32, since
    emulated bf16 is slower than fp32. Other devices: fp32. `precision_note` words the difference.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision: bf16 is not supported on this GPU; use fp16 or fp32")
        return precision
    if device.type == "cpu":
        return "fp32" if precision == "bf16" and not cpu_has_native_bf16() else precision
    return "fp32"


def precision_note(precision: str, device: torch.device) -> str | None:
    """What a run asked for ``train.precision`` gets on ``device`` when that is not simply what it asked: a
    fall-back to fp32, or fp16 emulated by a CPU without native fp16; None otherwise."""
    device = torch.device(device)
    used = effective_precision(precision, device)
    if device.type == "cpu" and precision == "bf16" and used == "fp32":
        return (
            "train.precision bf16: this CPU has no native bf16 arithmetic (AVX512_BF16 or AMX-BF16), where "
            "bf16 autocast runs emulated and slower than fp32: training in fp32"
        )
    if device.type == "cpu" and precision == "fp16" and not cpu_has_native_fp16():
        better = "bf16 (native here) or fp32" if cpu_has_native_bf16() else "fp32"
        return (
            "train.precision fp16 on this CPU (no AVX512_FP16 or AMX-FP16) runs emulated, far slower than fp32 "
            "(19x for a ViT-B/32 step, measured); the loss scaler works as on CUDA. For speed on this CPU set "
            f"train.precision to {better}"
        )
    if used != precision:
        return f"train.precision {precision} is for cuda and cpu: training in fp32 on {device.type}"
    return None
