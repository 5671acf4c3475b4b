"""Mug-STAN's alignment head: captions scored against videos token by frame (Liu et al., arXiv 2311.15075).

STAN scores a caption against a video by the cosine of two pooled embeddings. Mug-STAN keeps the per-token text
features (`VideoCLIP.encode_text(ids, pool=False)`) and the per-frame video features
(`VideoCLIP.encode_video(video, pool=False)`), takes every token-by-frame cosine, and pools them in both
directions with softmax weights at temperature ``tau`` (100): each token attends to the frames that match it, each
frame to the tokens that match it, and then the tokens and the frames are pooled the same way. Padding tokens are
masked out, so a caption is judged by its words, and a video by the frames that some word describes — the
"mutual-guided" alignment of the paper (its Sec. 3).

`mug_similarity` reproduces the official head (``mmaction/models/heads/mug_head.py``, ``Mug_head`` in eval mode,
farewellthree/STAN) for its three parameter-free modes; ``tests/test_mug.py`` pins all three to the reference
outputs in ``../shared/parity/mugstan_tiny_a``. Two details of the reference are kept on purpose:

* Masked positions are recognised, as there, by a masked cosine of exactly 0 (``where(x == 0, -inf, x)``): the
  padding tokens' cosines are multiplied by the mask and then excluded from the softmaxes over tokens.
* In ``mug_frame_token`` only the first-stage softmax over tokens excludes padding; the second stage pools over
  every position, padding included (its scores are not zero there), as the reference does.

``mug_frame_token`` in the reference builds ``(texts, videos, tokens, D)`` tensors (frame features re-weighted per
token); here the same numbers come from the cosine tensor alone, since ``<sum_v p_v f_v, t> = sum_v p_v cos(t, f_v)``,
so no mode ever needs more than one ``(texts, videos, tokens, frames)`` block of cosines per step.

The fourth official mode, ``drl_wti`` (DRL's weighted token interaction), has two learned linear layers
(``text_weight_fc``, ``video_weight_fc``). No released Mug-STAN checkpoint and no official config trains it, and the
parity references do not pin it, so its weights and their initialisation cannot be checked against anything: it is
not implemented, and loading a checkpoint that carries those weights fails with a message that says so.

Every score is in cosine units (the head's ``tau`` only sharpens its internal softmaxes); training multiplies them
by the recipe's logit scale ``1 / 0.01`` (`stanvid.training.losses.mug_contrastive_loss`), evaluation ranks them as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stanvid.errors import ConfigError
from stanvid.models.config import MUG_MODES

__all__ = ["MUG_MODES", "mug_similarity", "mug_block_size"]

# the official head divides by max(norm, 1e-6)
_NORM_EPS = 1e-6


def _excluding_zeros(x: torch.Tensor) -> torch.Tensor:
    """The reference's mask test: an exactly-zero (masked) score becomes -inf before a softmax."""
    return x.masked_fill(x == 0, float("-inf"))


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) mask -> (N,) index of the last position before the first padding one (the end-of-text token).

    The reference takes ``mask.argmin(-1) - 1``: the first zero, minus one, wrapping to ``L - 1`` when the mask has
    no zero (a caption that fills the context).
    """
    return (mask.argmin(dim=-1) - 1) % mask.shape[1]


def _check(
    token_emb: torch.Tensor, text_mask: torch.Tensor, frame_emb: torch.Tensor, tau: float, mode: str
) -> None:
    if mode not in MUG_MODES:
        extra = (
            " (drl_wti has learned weights that nothing pins down; see stanvid.models.mug)"
            if mode == "drl_wti"
            else ""
        )
        raise ConfigError(f"unknown Mug head mode {mode!r}{extra}; valid modes: {', '.join(MUG_MODES)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        raise ConfigError(f"tau must be a positive number, got {tau!r}")
    if token_emb.ndim != 3 or frame_emb.ndim != 3:
        raise ValueError(
            f"expected token_emb (N, L, D) and frame_emb (B, T, D); got {tuple(token_emb.shape)} "
            f"and {tuple(frame_emb.shape)}"
        )
    if token_emb.shape[-1] != frame_emb.shape[-1]:
        raise ValueError(
            f"token and frame features must have the same width; got {token_emb.shape[-1]} and {frame_emb.shape[-1]}"
        )
    if tuple(text_mask.shape) != tuple(token_emb.shape[:2]):
        raise ValueError(
            f"text_mask must be (N, L) = {tuple(token_emb.shape[:2])} like token_emb, got {tuple(text_mask.shape)}"
        )


def _block(
    tokens: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor, tau: float, mode: str
) -> torch.Tensor:
    """Logits of one block: normalized tokens (n, L, D), float mask (n, L), normalized frames (b, T, D) -> (n, b)."""
    if mode == "mug_frame_text":
        # only the end-of-text row of the cosines is used; both directions give the same number there
        n = tokens.shape[0]
        last = _last_token_index(mask)  # (n,)
        rows = torch.arange(n, device=tokens.device)
        text = tokens[rows, last] * mask[rows, last].unsqueeze(-1)  # (n, D)
        cos = torch.einsum("ad,bvd->abv", text, frames)  # (n, b, T)
        return (cos * torch.softmax(cos * tau, dim=-1)).sum(-1)  # (n, b)
    cos = torch.einsum("atd,bvd->abtv", tokens, frames)  # (n, b, L, T)
    masked = cos * mask[:, None, :, None]  # (n, b, L, T): padding rows are 0
    to_frames = torch.softmax(masked * tau, dim=-1)  # each token over the frames
    to_tokens = torch.softmax(_excluding_zeros(masked) * tau, dim=-2)  # each frame over the real tokens
    if mode == "mug_frame_token_simple":
        t2v = (masked * to_frames).sum(-1)  # (n, b, L)
        v2t = (masked * to_tokens).sum(-2)  # (n, b, T)
        t2v = (t2v * torch.softmax(_excluding_zeros(t2v) * tau, dim=-1)).sum(-1)  # (n, b)
        v2t = (v2t * torch.softmax(v2t * tau, dim=-1)).sum(-1)  # (n, b)
        return (t2v + v2t) / 2.0
    # mug_frame_token: the scores of the attended features, from the unmasked cosines
    t2v = (cos * to_frames).sum(-1)  # (n, b, L)
    v2t = (cos * to_tokens).sum(-2)  # (n, b, T)
    token_weight = torch.softmax(_excluding_zeros(t2v) * tau, dim=-1)  # (n, b, L), padding included
    frame_weight = torch.softmax(v2t * tau, dim=-1)  # (n, b, T)
    return torch.einsum("abt,abtv,abv->ab", token_weight, cos, frame_weight)  # (n, b)


def mug_similarity(
    token_emb: torch.Tensor,
    text_mask: torch.Tensor,
    frame_emb: torch.Tensor,
    *,
    tau: float = 100.0,
    mode: str = "mug_frame_token_simple",
    chunk: int | None = None,
) -> torch.Tensor:
    """The Mug head's scores of every caption against every video, ``(N, B)``, in cosine units.

    Args:
        token_emb: ``(N, L, D)`` per-token text features (`encode_text(ids, pool=False)`), unnormalized.
        text_mask: ``(N, L)``, nonzero for real tokens (``ids != 0``: start, words, end-of-text).
        frame_emb: ``(B, T, D)`` per-frame video features (`encode_video(video, pool=False)`), unnormalized.
        tau: the head's softmax temperature (a multiplier, 100 in the official configs).
        mode: ``mug_frame_token_simple`` (the official default, used by every config and the evaluation),
            ``mug_frame_token`` or ``mug_frame_text``.
        chunk: score at most ``chunk`` captions x ``chunk`` videos at a time (every softmax of the head stays
            inside one caption-video pair, so blocks are independent and the result is the same); ``None`` scores
            all pairs at once. Memory per block is a few ``chunk^2 * L * T`` floats.

    Differentiable (training calls it on the gathered batch). Computed in the features' dtype; pass float32.
    """
    _check(token_emb, text_mask, frame_emb, tau, mode)
    tau = float(tau)
    tokens = F.normalize(token_emb, dim=-1, eps=_NORM_EPS)  # (N, L, D)
    frames = F.normalize(frame_emb, dim=-1, eps=_NORM_EPS)  # (B, T, D)
    mask = (text_mask != 0).to(tokens.dtype)  # (N, L)
    if chunk is None:
        return _block(tokens, mask, frames, tau, mode)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ConfigError(f"chunk must be a positive integer or None, got {chunk!r}")
    n, b = tokens.shape[0], frames.shape[0]
    out = tokens.new_empty((n, b))
    for i in range(0, n, chunk):
        for j in range(0, b, chunk):
            out[i : i + chunk, j : j + chunk] = _block(
                tokens[i : i + chunk], mask[i : i + chunk], frames[j : j + chunk], tau, mode
            )
    return out


def mug_block_size(tokens: int, frames: int, budget_mb: float = 64.0) -> int:
    """Captions (and videos) per `mug_similarity` block so that one ``(c, c, tokens, frames)`` float32 tensor
    stays under ``budget_mb`` megabytes; the head holds a few of them at once."""
    per_pair = max(1, tokens * frames) * 4  # bytes of one pair's cosines
    return max(1, int(math.sqrt(budget_mb * 2**20 / per_pair)))
