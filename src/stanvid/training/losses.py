"""Training losses: symmetric InfoNCE over the global batch, SigLIP's sigmoid loss, and the recognition
cross-entropy.

The official STAN recognizer (``mmaction/models/recognizers/clip_similarity.py``, ``CLIPSimilarity_split``) gathers
the video and text features of every GPU (``GatherLayer``), so each rank computes the *same* loss over the whole
global batch: ``NormSoftmaxLoss`` (``mmaction/models/losses/contractive_loss.py``) takes the cosine matrix of
the L2-normalized features times the logit scale (``1 / tau``, fixed per recipe), and returns the video->text
cross-entropy (mean over all global rows) **plus** the text->video one; the two directions are summed, not
averaged. `contrastive_loss` computes exactly that.

Gradients across ranks. Official ``GatherLayer.backward`` hands each rank only the gradient of its own copy of
the loss with respect to its own slice; DDP then averages over the W ranks, so the encoder gradients are
``1 / W`` of the gradient one process would get with the whole batch (harmless for AdamW except through its
``eps`` and the gradient-clipping threshold), while a learnable logit scale gets the full gradient.
`all_gather_with_grad` instead sums the slice gradients of all ranks' (identical) losses in backward, as
``torch.distributed.nn.functional.all_gather`` does; after DDP's averaging every parameter, encoder and logit
scale alike, gets exactly the single-process full-batch gradient, independent of the number of GPUs
(tests/test_losses.py checks 2 ranks against 1). To reproduce the official clipping behaviour on W GPUs,
clip at ``W x`` its threshold.

The sigmoid loss (SigLIP, Zhai et al. 2023) scores each video-caption pair on its own, as a binary
"matching or not" with a learned bias: `sigmoid_loss`. It gathers the features of every rank the same way, so
it is the one-process loss of the global batch on any number of GPUs, and exact accumulation applies to it as
to InfoNCE. (SigLIP's own implementation passes text features around a ring of GPUs instead of gathering them,
to save memory at batch sizes of tens of thousands; the number is the same.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stanvid.distributed import rank_world
from stanvid.errors import ConfigError

__all__ = [
    "all_gather_with_grad",
    "contrastive_loss",
    "sigmoid_loss",
    "mug_contrastive_loss",
    "text_classifier_logits",
    "recognition_loss",
]

# `sim_matrix` in the official loss divides by max(norm, 1e-8); F.normalize does the same.
_NORM_EPS = 1e-8


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (local batch sizes may differ); backward sums the gradients of all ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        rank, world = rank_world(group)
        local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
        sizes = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(sizes, local, group=group)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = tensor.contiguous()
        if tensor.shape[0] < longest:
            pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([padded, pad])  # (longest, ...)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        ctx.group = group
        ctx.offset = sum(counts[:rank])
        ctx.count = counts[rank]
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])  # (sum(counts), ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset : ctx.offset + ctx.count], None


def all_gather_with_grad(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``tensor`` (local batch first) from every rank along dim 0, in rank order, keeping autograd.

    ``(B_r, ...)`` on rank r -> ``(sum_r B_r, ...)`` on every rank. Backward all-reduces (sums) the gradient of
    the gathered tensor and returns this rank's slice. This is exact when every rank computes the same function
    of the gathered tensor (as `contrastive_loss` does): with DDP's gradient averaging, W ranks then give the
    same parameter gradients as one process holding the global batch. Without an initialized process group, or
    with one process, it returns ``tensor`` itself.
    """
    if rank_world(group)[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group)


def _full_precision(reference: torch.Tensor) -> torch.autocast:
    """Autocast off for the loss: with logit scale 100, fp16 cosines (3 digits) would blur the softmax."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


def _check_scale(logit_scale: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        return logit_scale.float().reshape(())
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not logit_scale > 0:
        raise ConfigError(f"logit_scale must be a positive number or a scalar tensor, got {logit_scale!r}")
    return float(logit_scale)


def contrastive_loss(
    video_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    gather: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of paired video and text features, summed over the two directions (official STAN).

    Args:
        video_features: ``(B, D)`` this rank's video embeddings (unnormalized; normalized here).
        text_features: ``(B, D)`` the matching texts, row i with row i.
        logit_scale: the multiplier of the cosine (not its log): ``1 / tau`` for the recipes' fixed temperature
            (100 for tau 0.01), or ``model.logit_scale.exp()`` when the temperature is learned.
        gather: gather the features of all ranks with `all_gather_with_grad`, so the loss sees the global batch
            (the official behaviour); a no-op on one process.

    Returns:
        A scalar: ``CE(video -> text) + CE(text -> video)``, each the mean over the global batch, computed in
        float32 whatever the autocast precision of the features. Identical on every rank.
    """
    _check_pairs(video_features, text_features)
    scale = _check_scale(logit_scale)
    with _full_precision(video_features):
        video = F.normalize(video_features.float(), dim=-1, eps=_NORM_EPS)
        text = F.normalize(text_features.float(), dim=-1, eps=_NORM_EPS)
        if gather:
            video = all_gather_with_grad(video, group)  # (B_global, D)
            text = all_gather_with_grad(text, group)  # (B_global, D)
        logits = scale * video @ text.T  # (B_global, B_global): rows are videos
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def _check_bias(logit_bias: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(logit_bias, torch.Tensor):
        if logit_bias.numel() != 1:
            raise ValueError(f"logit_bias must be a scalar, got shape {tuple(logit_bias.shape)}")
        return logit_bias.float().reshape(())
    if (
        isinstance(logit_bias, bool)
        or not isinstance(logit_bias, (int, float))
        or not math.isfinite(logit_bias)
    ):
        raise ConfigError(f"logit_bias must be a finite number or a scalar tensor, got {logit_bias!r}")
    return float(logit_bias)


def _check_pairs(video_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if video_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be (B, D); got video {tuple(video_features.shape)}, text {tuple(text_features.shape)}"
        )
    if video_features.shape != text_features.shape:
        raise ValueError(
            f"video and text features must pair up row by row; got {tuple(video_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )


def sigmoid_loss(
    video_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    gather: bool = True,
    *,
    group: Any = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of paired video and text features over the global batch.

    ``-sum_ij log sigmoid(z_ij (logit_scale * cos_ij + logit_bias)) / B``, with ``z_ij = +1`` for the matching
    pair (``i == j``) and ``-1`` for every other, ``B`` the global batch: every one of the ``B^2`` pairs is its
    own binary problem, and the sum is divided by ``B`` (not ``B^2``), as in SigLIP.

    Args:
        video_features: ``(B, D)`` this rank's video embeddings (unnormalized; normalized here).
        text_features: ``(B, D)`` the matching texts, row i with row i.
        logit_scale: the multiplier of the cosine (not its log), as for `contrastive_loss`:
            ``model.logit_scale.exp()`` when learned (SigLIP's), ``1 / tau`` when fixed.
        logit_bias: added to every scaled cosine (SigLIP's ``logit_bias``, learned, about -10 at the start).
        gather: gather the features of all ranks with `all_gather_with_grad`, so the loss sees the global batch
            and W ranks give the gradients of one process; a no-op on one process.

    Returns:
        A scalar, identical on every rank, computed in float32 whatever the autocast precision of the features.
    """
    _check_pairs(video_features, text_features)
    scale = _check_scale(logit_scale)
    bias = _check_bias(logit_bias)
    with _full_precision(video_features):
        video = F.normalize(video_features.float(), dim=-1, eps=_NORM_EPS)
        text = F.normalize(text_features.float(), dim=-1, eps=_NORM_EPS)
        if gather:
            video = all_gather_with_grad(video, group)  # (B_global, D)
            text = all_gather_with_grad(text, group)  # (B_global, D)
        logits = scale * video @ text.T + bias  # (B_global, B_global): rows are videos
        n = logits.shape[0]
        signs = 2.0 * torch.eye(n, device=logits.device) - 1.0  # +1 on the diagonal, -1 elsewhere
        return -F.logsigmoid(signs * logits).sum() / n


def mug_contrastive_loss(
    frame_features: torch.Tensor,
    token_features: torch.Tensor,
    text_mask: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    tau: float = 100.0,
    mode: str = "mug_frame_token_simple",
    gather: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """Mug-STAN's loss: the symmetric InfoNCE of `contrastive_loss` on the Mug head's scores (`stanvid.models.mug`).

    The official model (``CLIPSimilarity_split`` with ``adapter=Mug_head``) gathers the per-token text features,
    the per-frame video features and the text masks of every GPU inside the head, scores every caption of the
    global batch against every video, and hands the ``(texts, videos)`` scores to ``NormSoftmaxLoss`` with
    ``scale = 1 / tau`` of the recipe (0.01 to 0.05): text->video plus video->text cross-entropy. Here the
    features are gathered with `all_gather_with_grad` (exact single-process gradients under DDP, as for
    `contrastive_loss`).

    Args:
        frame_features: ``(B, T, D)`` this rank's per-frame video features.
        token_features: ``(B, L, D)`` the matching captions' per-token features.
        text_mask: ``(B, L)``, nonzero at real tokens (``ids != 0``).
        logit_scale: multiplier of the head's scores (``1 / tau`` of the recipe, or the learned scale).
        tau, mode: the head's temperature and mode (`ModelConfig.mug_tau`, `ModelConfig.mug_mode`).

    Returns:
        A scalar, identical on every rank, computed in float32.
    """
    from stanvid.models.mug import mug_similarity

    if (
        frame_features.ndim != 3
        or token_features.ndim != 3
        or frame_features.shape[0] != token_features.shape[0]
    ):
        raise ValueError(
            f"expected frame features (B, T, D) and token features (B, L, D) of the same batch; got "
            f"{tuple(frame_features.shape)} and {tuple(token_features.shape)}"
        )
    scale = _check_scale(logit_scale)
    with _full_precision(frame_features):
        frames = frame_features.float()
        tokens = token_features.float()
        mask = (text_mask != 0).float()
        if gather:
            frames = all_gather_with_grad(frames, group)  # (B_global, T, D)
            tokens = all_gather_with_grad(tokens, group)  # (B_global, L, D)
            mask = all_gather_with_grad(mask, group)  # (B_global, L)
        logits = scale * mug_similarity(
            tokens, mask, frames, tau=tau, mode=mode
        )  # (B_global, B_global): texts
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def text_classifier_logits(
    video_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Class scores of videos against class-name text embeddings: ``logit_scale * cos``, ``(B, D), (K, D) -> (B, K)``.

    This is how the official model does recognition (``task="recognition"``): the class names are encoded once
    by the text encoder (in eval mode, without gradient, then cached) and the video side is trained with
    cross-entropy on these scores at the same logit scale as retrieval.
    """
    if (
        video_features.ndim != 2
        or class_features.ndim != 2
        or video_features.shape[1] != class_features.shape[1]
    ):
        raise ValueError(
            f"expected video (B, D) and class (K, D) features; got {tuple(video_features.shape)} "
            f"and {tuple(class_features.shape)}"
        )
    scale = _check_scale(logit_scale)
    with _full_precision(video_features):
        video = F.normalize(video_features.float(), dim=-1, eps=_NORM_EPS)
        classes = F.normalize(class_features.float(), dim=-1, eps=_NORM_EPS)
        return scale * video @ classes.T  # (B, K)


def recognition_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of class logits (from `text_classifier_logits` or a linear head), mean over the local batch.

    Unlike the contrastive loss nothing is gathered: each video's loss depends only on itself, so DDP's
    averaging of equal-sized local batches already gives the global-batch gradient. Computed in float32 with
    autocast off, as every loss here.
    """
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits (B, K) and labels (B,); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    with _full_precision(logits):
        return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)
