"""Evaluation metrics: retrieval recall/rank, dual-softmax re-ranking, recognition top-k, result tables.

Retrieval follows the official STAN/CLIP4Clip metric (``mmaction/evaluation/metrics/retrieval_metric.py``):
``sim[text, video]``, text ``i`` matches video ``i``; R@K is the percentage of queries whose match is within the
first K, MdR and MnR the median and mean of the 1-based rank of the match. Text-to-video (t2v) ranks the videos
for each text; video-to-text (v2t) ranks the texts for each video (the matrix transposed).

Conventions where the reference is undefined or does not apply:

* **Ties** count against the query by default (``ties="pessimistic"``): the rank of the match is
  ``1 + #{wrong candidates scoring >= the match}``. The official ``np.where(sorted == diagonal)`` returns
  several positions for a tied row and then mixes them into the statistics; counting ties as losses instead is
  deterministic and gives a degenerate model (constant scores) the worst rank, not the best. With ``g`` wrong
  candidates above the match and ``e`` tied with it, ``ties="optimistic"`` ranks it ``g + 1`` (ties count
  for it) and ``ties="expected"`` takes the expectation under a uniformly random order of the tied block: the
  rank is uniform over ``g + 1 .. g + e + 1``, so R@K counts ``clip((K - g) / (e + 1), 0, 1)`` of a hit, and
  MnR / MdR use the expected rank ``g + 1 + e / 2``. ``tie_tolerance`` counts scores that close as tied (a
  sum taken in another order differs by float rounding only).
* **Several captions per video** (MSVD): ``text_to_video[i]`` is the video of text row ``i``. The t2v rank of a
  text is the rank of its video; the v2t rank of a video is the best rank, among all texts, of any of its
  captions (``1 + #{captions of other videos scoring >= its best caption}``). CLIP4Clip instead max-pools each
  video's captions into one candidate and ranks among videos; our v2t ranks among texts.

Nothing here needs the whole score matrix at once: ranks are derived chunk by chunk (a block of rows for t2v,
of columns for v2t) and only the ranks are kept, so ``retrieval_metrics_from_features`` on 100k x 100k needs
``chunk x 100k`` scores in memory, not 40 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stanvid.errors import ConfigError

__all__ = [
    "retrieval_metrics",
    "retrieval_metrics_from_features",
    "dual_softmax",
    "chunked_similarity",
    "topk_accuracy",
    "average_views",
    "format_table",
]

RETRIEVAL_KEYS = ("R1", "R5", "R10", "MdR", "MnR")
DEFAULT_CHUNK = 1024
TIES = ("pessimistic", "optimistic", "expected")

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike | Sequence, name: str, ndim: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Half precision is widened: ranks compare scores, and fp16 would create ties that float32 does not have."""
    if not t.is_floating_point():
        return t.double()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_finite(block: torch.Tensor, what: str) -> None:
    if not torch.isfinite(block).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def _text_to_video(
    text_to_video: ArrayLike | Sequence[int] | None, n_text: int, n_video: int
) -> torch.Tensor:
    """The video index of every text row as an int64 tensor, validated (every video needs a caption)."""
    if text_to_video is None:
        if n_text != n_video:
            raise ValueError(
                f"the similarity matrix is {n_text} x {n_video} (texts x videos); a non-square matrix needs "
                "text_to_video (the video index of every text row)"
            )
        return torch.arange(n_text)
    ids = _as_tensor(text_to_video, "text_to_video", 1)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"text_to_video must hold integer video indices, got dtype {ids.dtype}")
    ids = ids.long().cpu()
    if ids.numel() != n_text:
        raise ValueError(f"text_to_video has {ids.numel()} entries but there are {n_text} texts")
    if n_text and (ids.min() < 0 or ids.max() >= n_video):
        raise ValueError(
            f"text_to_video values must be in [0, {n_video}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    captions = torch.bincount(ids, minlength=n_video)
    missing = torch.nonzero(captions == 0).flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} video(s) have no caption in text_to_video (indices {shown}); v2t needs one"
        )
    return ids


def _above_and_tied(
    block: torch.Tensor, match: torch.Tensor, wrong: torch.Tensor, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: wrong candidates scoring above the match, and within `tolerance` of it (the tied block)."""
    if tolerance == 0:  # exact comparisons: the default, and no float addition that could round
        above = (block > match) & wrong
        tied = (block == match) & wrong
    else:
        above = (block > match + tolerance) & wrong
        tied = ((block - match).abs() <= tolerance) & wrong
    return above.sum(1).cpu(), tied.sum(1).cpu()


def _t2v_ranks(
    rows: Callable[[int, int], torch.Tensor], n_text: int, ids: torch.Tensor, chunk: int, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(above, tied) of each text's video among all videos; `rows(a, b)` gives scores (b - a, n_video)."""
    above, tied = torch.empty(n_text, dtype=torch.long), torch.empty(n_text, dtype=torch.long)
    for start in range(0, n_text, chunk):
        stop = min(start + chunk, n_text)
        block = rows(start, stop)  # (R, M)
        _check_finite(block, "the similarity")
        target = ids[start:stop].to(block.device)
        true = block.gather(1, target[:, None])  # (R, 1)
        wrong = torch.ones_like(block, dtype=torch.bool).scatter_(1, target[:, None], False)
        above[start:stop], tied[start:stop] = _above_and_tied(block, true, wrong, tolerance)
    return above, tied


def _v2t_ranks(
    cols: Callable[[int, int], torch.Tensor], n_video: int, ids: torch.Tensor, chunk: int, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(above, tied) of each video's best caption among all texts; `cols(a, b)` gives (b - a, n_text)."""
    above, tied = torch.empty(n_video, dtype=torch.long), torch.empty(n_video, dtype=torch.long)
    for start in range(0, n_video, chunk):
        stop = min(start + chunk, n_video)
        block = cols(start, stop)  # (C, N)
        _check_finite(block, "the similarity")
        own = (
            ids.to(block.device)[None, :] == torch.arange(start, stop, device=block.device)[:, None]
        )  # (C, N)
        best = block.masked_fill(~own, -math.inf).amax(1, keepdim=True)  # (C, 1)
        above[start:stop], tied[start:stop] = _above_and_tied(block, best, ~own, tolerance)
    return above, tied


def _summary(ranks: tuple[torch.Tensor, torch.Tensor], ties: str, ks: Sequence[int]) -> dict[str, float]:
    """R@K in percent, MdR/MnR 1-based, from (above, tied) per query under the `ties` rule (module docstring).

    Pessimistic and optimistic ranks are computed the way the official metric does (0-based index, then + 1).
    """
    above, tied = ranks
    n = len(above)
    if n == 0:
        raise ValueError("no queries to rank")
    if ties == "expected":
        a, e = above.double(), tied.double()
        out = {f"R{k}": float(((k - a) / (e + 1)).clamp(0, 1).mean() * 100) for k in ks}
        expected = (a + e / 2).numpy()  # 0-based expected rank
        return {**out, "MdR": float(np.median(expected) + 1), "MnR": float(np.mean(expected) + 1)}
    ind = (above + tied if ties == "pessimistic" else above).numpy()
    return {
        **{f"R{k}": float(np.sum(ind < k)) * 100 / n for k in ks},
        "MdR": float(np.median(ind) + 1),
        "MnR": float(np.mean(ind) + 1),
    }


def _check_ranking(ties: str, tie_tolerance: float, ks: Sequence[int]) -> tuple[float, tuple[int, ...]]:
    if ties not in TIES:
        raise ConfigError(f"ties must be one of {', '.join(TIES)}; got {ties!r}")
    tol = tie_tolerance
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ConfigError(f"tie_tolerance must be a number >= 0, got {tol!r}")
    ks = _check_ks(ks)
    if not ks:  # a retrieval summary always reports some R@K
        raise ConfigError(f"ks must be positive integers, got {ks!r}")
    return float(tol), ks


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The K of R@K / top-K, each a positive integer."""
    ks = tuple(ks)
    if any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {ks!r}")
    return ks


def _check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")


def _dsl_weight(scores: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    # exp(s / T - logsumexp) is the softmax, written with a precomputed normalizer so that the streaming
    # path (normalizer accumulated over chunks) and the dense path compute the same expression.
    return scores * torch.exp(scores / temperature - lse)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"the dual-softmax temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def dual_softmax(sim: ArrayLike, temperature: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-softmax (DSL) re-ranking at inference (CAMoE, arXiv 2109.04290; as used by TS2-Net/DRL/STAN tables).

    Each score is multiplied by a prior that says how strongly the *other* side prefers the pair:

    * for text-to-video, ``sim * softmax(sim / T)`` taken over the texts (for each video, dim 0): a video that
      matches many texts equally is discounted;
    * for video-to-text, ``sim * softmax(sim / T)`` over the videos (for each text, dim 1).

    The reference implementations multiply by the matrix size as well; that constant does not change any rank
    and is left out. ``temperature`` is in the units of ``sim``: 0.01 for cosine scores (the same as ``T = 1``
    on scores already multiplied by CLIP's logit scale 100).

    Returns ``(t2v_sim, v2t_sim)``, both ``(texts, videos)``; rank t2v on the first and v2t on the second.
    """
    temperature = _check_temperature(temperature)
    s = _as_float(_as_tensor(sim, "sim", 2))
    _check_finite(s, "sim")
    s_t = s / temperature
    t2v = _dsl_weight(s, torch.logsumexp(s_t, dim=0, keepdim=True), temperature)  # prior over texts
    v2t = _dsl_weight(s, torch.logsumexp(s_t, dim=1, keepdim=True), temperature)  # prior over videos
    return t2v, v2t


def retrieval_metrics(
    sim: ArrayLike,
    text_to_video: ArrayLike | Sequence[int] | None = None,
    *,
    dsl_temperature: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    ties: str = "pessimistic",
    tie_tolerance: float = 0.0,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """R@1/5/10, MdR, MnR for both directions from a similarity matrix ``sim[text, video]``.

    Args:
        sim: ``(texts, videos)`` scores, torch tensor or numpy array. Without ``text_to_video`` it must be
            square, text ``i`` matching video ``i``.
        text_to_video: for several captions per video, the video index of every text row (see the module
            docstring for how v2t is ranked then).
        dsl_temperature: when given, the metrics of the dual-softmax re-ranked scores (`dual_softmax`) instead
            of the plain ones; report the two separately, as the paper does.
        chunk: rows (t2v) / columns (v2t) compared at once; only bounds temporary memory.
        ties: how a wrong candidate scoring the same as the match counts: ``pessimistic`` (against the
            query, the default), ``optimistic`` (for it) or ``expected`` (a random order of the tied block);
            see the module docstring.
        tie_tolerance: scores within this of the match count as tied (default 0: exactly equal).
        ks: the K of the R@K reported (keys ``R{K}``).

    Returns:
        ``{"t2v": {"R1", "R5", "R10", "MdR", "MnR"}, "v2t": {...}}``, R@K in percent, ranks 1-based.
    """
    _check_chunk(chunk)
    tolerance, ks = _check_ranking(ties, tie_tolerance, ks)
    s = _as_float(_as_tensor(sim, "sim", 2))
    n_text, n_video = s.shape
    ids = _text_to_video(text_to_video, n_text, n_video)
    if dsl_temperature is None:
        t2v_sim = v2t_sim = s
    else:
        t2v_sim, v2t_sim = dual_softmax(s, dsl_temperature)
    t2v = _t2v_ranks(lambda a, b: t2v_sim[a:b], n_text, ids, chunk, tolerance)
    v2t = _v2t_ranks(lambda a, b: v2t_sim[:, a:b].T, n_video, ids, chunk, tolerance)
    return {"t2v": _summary(t2v, ties, ks), "v2t": _summary(v2t, ties, ks)}


def _features(x: ArrayLike, name: str, normalize: bool) -> torch.Tensor:
    t = _as_float(_as_tensor(x, name, 2))
    _check_finite(t, name)
    return F.normalize(t, dim=-1) if normalize else t


def _feature_pair(
    text_feats: ArrayLike, video_feats: ArrayLike, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    t = _features(text_feats, "text_feats", normalize)
    v = _features(video_feats, "video_feats", normalize)
    if t.shape[1] != v.shape[1]:
        raise ValueError(f"text_feats have dimension {t.shape[1]} but video_feats {v.shape[1]}")
    if t.device != v.device:
        raise ValueError(f"text_feats are on {t.device} but video_feats on {v.device}")
    dtype = torch.promote_types(t.dtype, v.dtype)
    return t.to(dtype), v.to(dtype)


def chunked_similarity(
    text_feats: ArrayLike,
    video_feats: ArrayLike,
    *,
    chunk: int = DEFAULT_CHUNK,
    normalize: bool = True,
) -> torch.Tensor:
    """The full ``(texts, videos)`` cosine matrix, computed on the features' device a block of texts at a time
    and gathered on the CPU, so the accelerator never holds more than ``chunk x videos`` scores.

    Use it when the matrix itself is wanted (to save it, or for `retrieval_metrics`); to get the metrics of a
    matrix too large to hold, use `retrieval_metrics_from_features`.
    """
    _check_chunk(chunk)
    t, v = _feature_pair(text_feats, video_feats, normalize)
    out = torch.empty(t.shape[0], v.shape[0], dtype=t.dtype)
    for start in range(0, t.shape[0], chunk):
        out[start : start + chunk] = (t[start : start + chunk] @ v.T).cpu()  # (R, M)
    return out


def retrieval_metrics_from_features(
    text_feats: ArrayLike,
    video_feats: ArrayLike,
    text_to_video: ArrayLike | Sequence[int] | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    normalize: bool = True,
    dsl_temperature: float | None = None,
    ties: str = "pessimistic",
    tie_tolerance: float = 0.0,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """`retrieval_metrics` of the cosine matrix of the features, without ever holding that matrix.

    t2v walks over blocks of ``chunk`` texts (scores against every video), v2t over blocks of ``chunk`` videos;
    each block is reduced to ranks at once. Dual-softmax needs the normalizer of every row and column first,
    which one more pass accumulates (a log-sum-exp per text and per video). Computation runs on the features'
    device; memory is ``O(chunk x max(texts, videos))``.

    Args:
        text_feats: ``(texts, D)``; video_feats: ``(videos, D)``; torch tensors (any device) or numpy arrays.
        text_to_video, dsl_temperature, ties, tie_tolerance, ks: as in `retrieval_metrics`.
        normalize: L2-normalize the features first (cosine similarity, as the official metric does).
    """
    _check_chunk(chunk)
    tolerance, ks = _check_ranking(ties, tie_tolerance, ks)
    t, v = _feature_pair(text_feats, video_feats, normalize)
    n_text, n_video = t.shape[0], v.shape[0]
    ids = _text_to_video(text_to_video, n_text, n_video)

    if dsl_temperature is None:

        def rows(a: int, b: int) -> torch.Tensor:
            return t[a:b] @ v.T  # (R, M)

        def cols(a: int, b: int) -> torch.Tensor:
            return v[a:b] @ t.T  # (C, N)

    else:
        temperature = _check_temperature(dsl_temperature)
        row_lse = torch.empty(n_text, dtype=t.dtype, device=t.device)
        col_lse = torch.full((n_video,), -math.inf, dtype=t.dtype, device=t.device)
        for start in range(0, n_text, chunk):
            scaled = (t[start : start + chunk] @ v.T) / temperature  # (R, M)
            _check_finite(scaled, "the similarity / dsl_temperature")
            row_lse[start : start + chunk] = torch.logsumexp(scaled, dim=1)
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(scaled, dim=0))

        def rows(a: int, b: int) -> torch.Tensor:
            return _dsl_weight(t[a:b] @ v.T, col_lse[None, :], temperature)  # (R, M), prior over texts

        def cols(a: int, b: int) -> torch.Tensor:
            return _dsl_weight(v[a:b] @ t.T, row_lse[None, :], temperature)  # (C, N), prior over videos

    t2v = _t2v_ranks(rows, n_text, ids, chunk, tolerance)
    v2t = _v2t_ranks(cols, n_video, ids, chunk, tolerance)
    return {"t2v": _summary(t2v, ties, ks), "v2t": _summary(v2t, ties, ks)}


def topk_accuracy(
    logits: ArrayLike, labels: ArrayLike | Sequence[int], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent: ``{"top1": ..., "top5": ...}`` for ``ks=(1, 5)``.

    A sample counts as correct at k when fewer than k other classes score at least as high as its label (ties
    count against it, as in the retrieval ranks). ``logits`` may be scores or probabilities: ``(N, classes)``.
    """
    scores = _as_float(_as_tensor(logits, "logits", 2))
    _check_finite(scores, "logits")
    target = _as_tensor(labels, "labels", 1)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {target.dtype}")
    target = target.long().to(scores.device)
    n, num_classes = scores.shape
    if target.numel() != n:
        raise ValueError(f"{n} rows of logits but {target.numel()} labels")
    if n == 0:
        raise ValueError("no samples to score")
    if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got [{int(target.min())}, {int(target.max())}]"
        )
    ks = _check_ks(ks)
    true = scores.gather(1, target[:, None])  # (N, 1)
    rank = (scores >= true).sum(1)  # 1-based, ties against
    return {f"top{k}": float((rank <= k).sum().item()) * 100 / n for k in ks}


def average_views(logits: ArrayLike, num_views: int, mode: str = "prob") -> torch.Tensor:
    """Average the scores of the test views (temporal clips x spatial crops) of each video: (N*V, C) -> (N, C).

    Rows must be grouped by video, views contiguous (``video0-view0, video0-view1, ...``), the layout mmaction2's
    ``average_clip`` assumes (``view(N, V, C)``).

    ``mode="prob"`` (the default) averages the softmax probabilities, ``mode="score"`` the raw logits. mmaction2
    supports both through ``test_cfg.average_clips``; its configs choose ``'prob'`` (every config in the STAN
    repository that sets it), so multi-view numbers in the literature are probability averages.
    """
    scores = _as_float(_as_tensor(logits, "logits", 2))
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views <= 0:
        raise ConfigError(f"num_views must be a positive integer, got {num_views!r}")
    if scores.shape[0] % num_views:
        raise ValueError(
            f"{scores.shape[0]} rows of logits are not a whole number of {num_views}-view groups"
        )
    if mode == "prob":
        scores = scores.softmax(dim=-1)
    elif mode != "score":
        raise ConfigError(f"mode must be 'prob' or 'score', got {mode!r}")
    return scores.view(-1, num_views, scores.shape[1]).mean(dim=1)  # (N, V, C) -> (N, C)


def _rows(metrics: Mapping[str, Any], prefix: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Flatten nested dicts to (row name, {column: number}) rows; a dict of numbers is one row."""
    leaves = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    out: list[tuple[str, Mapping[str, Any]]] = []
    if leaves:
        out.append((prefix or "", leaves))
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.extend(_rows(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(metrics: Mapping[str, Any], digits: int = 1) -> str:
    """A plain-text table of (nested) metrics: one row per dict of numbers, one column per metric name.

    ``format_table({"t2v": {...}, "v2t": {...}})`` gives rows ``t2v`` and ``v2t`` under ``R1 R5 R10 MdR MnR``;
    deeper nesting (``{"plain": {...}, "dsl": {...}}``) names rows by path (``dsl/t2v``). Missing cells are "-".
    """
    rows = _rows(metrics, "")
    if not rows:
        raise ValueError("no metrics to format")
    columns: list[str] = []
    for _, values in rows:
        columns.extend(str(k) for k in values if str(k) not in columns)
    header = ["", *columns]
    body = [
        [name, *(_cell(values[c], digits) if c in values else "-" for c in columns)] for name, values in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for r in [header, *body]:
        first = r[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
    return "\n".join(lines)
