"""Moments: the start and end of what a query describes inside a file, not one of the index's fixed windows.

At index time (`stanvid index`, unless `--no-moments`) every file also gets *moment features*: the video is cut
into consecutive clips of `MOMENT_WINDOW` seconds, each sampled with the model's `num_frames` frames (so a sample
every ``step = window / num_frames`` seconds, at times ``(j + 0.5) * step``) and put through the video model with
`encode_video(..., pool=False)`: each sampled frame gets the per-frame vector the model's temporal module gives
it in the context of its clip (STAN's branch sees the clip as a whole). The window matters: on the demo's model
(trained on 1 s clips of 8 frames), windows of 1, 2 and 4 s gave R1@IoU0.7 1.00, 0.75 and 0.58 on 24 composed
moments (docs/search.md). They are kept as float16 unit vectors, one row per sample
(`stanvid.search.index.moment_store`).

At query time (`search_moments`): the vector index finds the candidate files as a plain search does (their
best segments, widened until `max(k, CANDIDATE_FILES)` files are found); each candidate's samples are scored
against the query (cosine), smoothed with a small Gaussian, and cut *relative to the file's own scores*
(`cut_moments`): a span is where the smoothed score stays above ``median + LEVEL * (max - median)`` of that
file, its bounds interpolated between samples where the score crosses the threshold; its score is the highest
smoothed score inside it (a span shorter than `MIN_MOMENT_SECONDS` is widened about its middle). The moments of
all candidates are ranked by score, and `pad` seconds widen each (clipped to the file). A file indexed without
moment features answers with its best segment, as a plain search does (`VideoIndex.moments_note` says why).

What a query adds to a plain one is reading the candidates' rows from SQLite (``samples x D x 2`` bytes a file),
one matrix-vector product over all of them and the cuts; a file whose best sample cannot beat the k-th moment
found is not cut.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stanvid.errors import QueryError

if TYPE_CHECKING:
    from stanvid.search.index import SearchResult, VideoIndex

__all__ = [
    "CANDIDATE_FILES",
    "LEVEL",
    "MOMENT_WINDOW",
    "Moment",
    "cut_moments",
    "file_moments",
    "moment_sample_times",
    "moment_step",
    "moment_windows",
    "score_samples",
    "search_moments",
    "smooth_scores",
]

MOMENT_WINDOW = 1.0  # seconds one clip of moment samples spans (num_frames samples in it)
SMOOTH_SECONDS = 0.125  # standard deviation of the Gaussian smoothing the samples' scores
LEVEL = 0.5  # the threshold: this fraction of the way from the file's median score to its maximum
CANDIDATE_FILES = 16  # candidate files scored per query (at least k)
MAX_MOMENTS_PER_FILE = 8
MAX_MOMENT_SAMPLES = 250_000  # a file with more (8.7 h at 8 a second) is indexed without moment features
MIN_MOMENT_SECONDS = 1.0  # a shorter span above the threshold is widened about its middle to this


@dataclass(frozen=True)
class Moment:
    """A span of one file, in seconds, with its score (the highest smoothed sample score inside it) and the
    time of that peak."""

    start: float
    end: float
    score: float
    peak: float


# ---------------------------------------------------------------------------------------------- sampling
def moment_step(clip_len: int, window: float = MOMENT_WINDOW) -> float:
    """Seconds between moment samples: a model of `clip_len` frames sees `window` seconds a clip."""
    return float(window) / clip_len


def moment_sample_count(duration: float, step: float) -> int:
    """How many moment samples a file of `duration` seconds has (one every `step`, the first at step / 2),
    counted without listing them (a bogus duration of years is a large number, not a large array)."""
    ratio = duration / step - 1e-9 if duration > 0 else 0.0
    if not math.isfinite(ratio):
        return MAX_MOMENT_SAMPLES + 1
    return max(1, math.ceil(ratio)) if ratio > 0 else 0


def moment_sample_times(duration: float, step: float, limit: int | None = None) -> np.ndarray:
    """(n,) times of the moment samples of a file: ``(j + 0.5) * step`` for every one before `duration` (the
    first `limit` of them when given)."""
    n = moment_sample_count(duration, step)
    n = n if limit is None else min(n, limit)
    if n > MAX_MOMENT_SAMPLES:
        raise ValueError(f"{n} moment samples; at most {MAX_MOMENT_SAMPLES} are listed")
    return (np.arange(n) + 0.5) * step


def moment_windows(
    duration: float, fps: float, num_frames: int, clip_len: int, step: float
) -> tuple[np.ndarray, np.ndarray]:
    """The frames to decode for a file's moment samples: (n,) sample times and `(m, clip_len)` frame indices,
    consecutive samples grouped into clips of `clip_len` (the last one padded with its last frame; the
    per-frame vectors past `n` are dropped). Frame i is shown from i / fps: a sample shows the frame on
    screen at its time. A file of more than `MAX_MOMENT_SAMPLES` samples (or no frames) gets none: its work
    must be bounded by what it holds, and a far timestamp makes a duration of years out of two frames."""
    count = moment_sample_count(duration, step)
    if not 0 < count <= MAX_MOMENT_SAMPLES or num_frames <= 0 or not (fps > 0 and math.isfinite(fps)):
        return np.zeros(0), np.zeros((0, clip_len), np.int64)
    times = moment_sample_times(duration, step)
    idx = np.clip(np.floor(times * fps + 1e-6), 0, num_frames - 1).astype(np.int64)  # (n,)
    pad = (-len(idx)) % clip_len
    idx = np.concatenate([idx, np.full(pad, idx[-1], np.int64)])
    return times, idx.reshape(-1, clip_len)  # (n,), (m, clip_len)


# ---------------------------------------------------------------------------------------------- scoring
def score_samples(query: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(D,) unit query and (n, D) sample vectors -> (n,) cosine similarities (rows normalized here)."""
    feats = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1)
    return (feats @ np.asarray(query, np.float32)) / np.maximum(norms, 1e-12)


@functools.lru_cache(maxsize=16)
def _kernel(sigma: float) -> np.ndarray:
    """The Gaussian weights, `sigma` in samples, out to 3 sigma."""
    half = max(1, int(math.ceil(3 * sigma)))
    return np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)


def smooth_scores(scores: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of (n,) scores, `sigma` in samples, edges renormalized (no fall-off at the ends)."""
    scores = np.asarray(scores, np.float64)
    if sigma <= 0 or len(scores) < 2:
        return scores.copy()
    kernel = _kernel(round(float(sigma), 6))
    half = len(kernel) // 2
    n = len(scores)
    total = np.convolve(scores, kernel)[half : half + n]  # (n,): centred, whatever n is against the kernel
    weight = np.convolve(np.ones_like(scores), kernel)[half : half + n]
    return total / weight


def _crossing(times: np.ndarray, values: np.ndarray, i: int, j: int, level: float) -> float:
    """Where the line from sample i to sample j crosses `level` (i below it, j at or above, or the reverse)."""
    a, b = values[i], values[j]
    frac = 0.5 if b == a else (level - a) / (b - a)
    return float(times[i] + min(1.0, max(0.0, frac)) * (times[j] - times[i]))


def cut_moments(
    times: np.ndarray,
    scores: np.ndarray,
    duration: float,
    *,
    step: float,
    smooth: float = SMOOTH_SECONDS,
    level: float = LEVEL,
    limit: int = MAX_MOMENTS_PER_FILE,
    min_seconds: float = MIN_MOMENT_SECONDS,
) -> list[Moment]:
    """The moments of one file from its samples' scores, best first.

    `times` (n,) sample times, `scores` (n,) their similarity to the query. The scores are smoothed
    (Gaussian, `smooth` seconds), and a moment is each run of samples at or above ``median + level * (max -
    median)``; its bounds are where the smoothed score crosses that threshold, interpolated between the
    samples either side (the file's start or end when the run reaches it); one shorter than `min_seconds` is
    widened about its middle to that. A file whose scores are flat (max == median) is one moment: all of it."""
    times = np.asarray(times, np.float64)
    if len(times) == 0:
        return []
    s = smooth_scores(scores, smooth / step)  # (n,)
    top, mid = float(s.max()), float(np.median(s))
    threshold = mid + level * (top - mid)
    above = s >= threshold if top > mid else np.ones(len(s), bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], above.astype(np.int8), [0]])))
    found = []
    for first, stop in zip(edges[::2], edges[1::2], strict=True):  # samples first .. stop-1 are above
        last = stop - 1
        start = 0.0 if first == 0 else _crossing(times, s, first - 1, first, threshold)
        end = float(duration) if stop == len(s) else _crossing(times, s, last, stop, threshold)
        peak = first + int(np.argmax(s[first:stop]))
        start, end = _at_least(start, max(end, start), min_seconds, float(duration))
        found.append(Moment(start, end, float(s[peak]), float(times[peak])))
    found.sort(key=lambda m: -m.score)
    return found[:limit]


def _at_least(start: float, end: float, seconds: float, duration: float) -> tuple[float, float]:
    """[start, end] widened about its middle to `seconds` when shorter, within [0, duration]."""
    if end - start >= seconds:
        return start, end
    seconds = min(seconds, duration)
    lo = min(max(0.0, (start + end - seconds) / 2), duration - seconds)
    return lo, lo + seconds


def pad_moment(start: float, end: float, pad: float, duration: float) -> tuple[float, float]:
    """[start, end] widened by `pad` seconds each side, within [0, duration]."""
    end = min(float(duration), end + pad) if duration > 0 else end + pad
    return max(0.0, start - pad), end


def check_pad(pad: Any) -> float:
    """`pad` as seconds; anything but a finite number >= 0 is a `QueryError` naming it."""
    if isinstance(pad, bool) or not isinstance(pad, int | float) or not math.isfinite(pad) or pad < 0:
        raise QueryError(f"pad must be a number of seconds >= 0, got {pad!r}")
    return float(pad)


# ---------------------------------------------------------------------------------------------- searching
def missing_moments(index: str, kept: int | None, files: int) -> str:
    """One line on why a moments search answers (some) hits with fixed segments: "" when each of the
    `files` files has its moment features (`kept` of them do; None: the index has no table for them)."""
    if kept is None:
        return (
            f"{index}: no moments in this index (built before `stanvid index` kept them): hits are its fixed "
            "segments; index the folder again into a new --out for moments"
        )
    if kept >= files:
        return ""
    if kept == 0:
        return (
            f"{index}: no moments in this index (built with --no-moments or imported from embeddings): hits "
            "are its fixed segments; index the folder into a new --out without --no-moments for moments"
        )
    return (
        f"{index}: {files - kept} of {files} files have no moments (indexed with --no-moments, imported "
        "from embeddings, or too long): their hits are fixed segments"
    )


def search_moments(
    index: VideoIndex, vector: np.ndarray, k: int, pad: float = 0.0, *, filters: Any = None, offset: int = 0
) -> list[SearchResult]:
    """The `k` best moments for a (D,) unit query vector, best first, as `SearchResult`s whose `start` and
    `end` bound each moment (`pad` seconds wider each side) and whose `score` is its peak score; `id` is the
    indexed segment that holds the peak. From one generation of the index (`VideoIndex.pinned`). `filters`
    choose the candidate files inside the vector search (`stanvid.search.index.filters`); `offset` skips the
    first moments (the next page)."""
    pad = check_pad(pad)
    with index.pinned() as view:
        return _search_moments(view, np.asarray(vector, np.float32), k + offset, pad, filters)[offset:]


def file_moments(
    index: VideoIndex,
    file_id: int,
    vector: np.ndarray,
    *,
    pad: float = 0.0,
    limit: int = MAX_MOMENTS_PER_FILE,
) -> list[Moment]:
    """The moments of one indexed file for a (D,) unit query vector, best first (`pad` seconds wider each
    side); a file indexed without moment features gives its segments, best first."""
    pad = check_pad(pad)
    vector = np.asarray(vector, np.float32)
    with index.pinned() as view:
        stored = view.moment_features([file_id])
        if file_id in stored:
            return _cut(stored[file_id], vector, pad, limit)
        segs, emb = view.file_segments(file_id)  # (n,), (n, D)
    ranked = sorted(zip(segs, emb @ vector, strict=True), key=lambda p: -p[1])[:limit]
    return [Moment(s.start, s.end, float(v), (s.start + s.end) / 2) for s, v in ranked]


def _cut(stored: tuple[float, float, np.ndarray], vector: np.ndarray, pad: float, limit: int) -> list[Moment]:
    """A file's moments from its stored (step, duration, features), padded."""
    step, duration, feats = stored
    (scores,) = _sample_scores([feats], vector)
    return _padded(cut_moments(moment_sample_times(duration, step, len(scores)), scores, duration, step=step,
                               limit=limit), pad, duration)  # fmt: skip


def _sample_scores(feats: list[np.ndarray], vector: np.ndarray) -> list[np.ndarray]:
    """Each file's (n, D) float16 unit rows, as the index keeps them, against a (D,) unit query -> its (n,)
    cosines: one conversion and one product for all the files."""
    if not feats:
        return []
    rows = torch.from_numpy(np.concatenate(feats)).float()  # (N, D)
    scores = (rows @ torch.from_numpy(np.ascontiguousarray(vector, np.float32))).numpy()  # (N,)
    return np.split(scores.astype(np.float64), np.cumsum([len(f) for f in feats])[:-1])


def _padded(moments: list[Moment], pad: float, duration: float) -> list[Moment]:
    return [Moment(*pad_moment(m.start, m.end, pad, duration), m.score, m.peak) for m in moments]


def _candidates(
    index: VideoIndex, vector: np.ndarray, want: int, filters: Any = None
) -> dict[int, SearchResult]:
    """The best segment of each of the `want` best files by the vector index (fewer when the index has
    fewer), widening the search x4 until they are found."""
    n = len(index)
    fetch = min(n, want)  # one segment a file (the default index) finds them at once
    best: dict[int, SearchResult] = {}
    while fetch > 0:
        best = {}
        for hit in index.search_embeddings(vector[None], fetch, filters=filters)[0]:
            best.setdefault(hit.file_id, hit)
        if len(best) >= want or fetch >= n:
            break
        fetch = min(n, fetch * 4)
    return dict(list(best.items())[:want])


def _search_moments(
    index: VideoIndex, vector: np.ndarray, k: int, pad: float, filters: Any = None
) -> list[SearchResult]:
    best = _candidates(index, vector, max(k, CANDIDATE_FILES), filters)
    if not best:
        return []
    stored = index.moment_features(list(best))  # file_id -> (step, duration, (n, D) features)
    # (score, file id, moment); a file indexed without moment features gives its best segment (moment None)
    found = [(hit.score, fid, None) for fid, hit in best.items() if fid not in stored]
    kept = [fid for fid in best if fid in stored]
    scores = _sample_scores([stored[fid][2] for fid in kept], vector)  # per file, (n,)
    files = sorted(zip(kept, scores, strict=True), key=lambda f: -float(f[1].max()))
    # a moment's score is a smoothed sample score, never above its file's best sample: files are cut best
    # first, and the rest skipped once k moments score at least as high as the next file's best sample
    top_k: list[float] = []  # the k best scores so far (a heap)
    for file_id, file_scores in files:
        if len(top_k) >= k and top_k[0] >= float(file_scores.max()):
            break
        step, duration, _ = stored[file_id]
        times = moment_sample_times(duration, step, len(file_scores))
        for m in _padded(cut_moments(times, file_scores, duration, step=step), pad, duration):
            found.append((m.score, file_id, m))
            (heapq.heappush if len(top_k) < k else heapq.heappushpop)(top_k, m.score)
    found.sort(key=lambda f: -f[0])
    top = found[:k]
    # each moment names the segment that holds its peak (for thumbnails and "more like this")
    ids = index.segments_at([(fid, m.peak) for _, fid, m in top if m is not None])
    out = []
    for score, fid, m in top:
        hit = best[fid]
        if m is not None:
            hit = dataclasses.replace(
                hit, id=ids.get((fid, m.peak), hit.id), start=m.start, end=m.end, score=score
            )
        out.append(hit)
    return out
