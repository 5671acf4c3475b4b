"""Copies of a clip: the files of an index that hold the same footage (re-encoded, trimmed, scaled, cropped),
found from the stored segment embeddings, without decoding anything.

Two steps:

1. **Similar segments.** Every pair of segments of two different files whose cosine is at least `threshold`
   and that are among each other's `RECIPROCAL` most similar segments of other files (`_reciprocal`).
   The segments are bucketed by the cells of the index's own inverted file (each in its `SPILL` nearest
   cells, so a pair that straddles a cell border still meets; an exact index is bucketed by a small k-means
   of its own), and each bucket is compared with itself exactly: near-identical vectors share a cell, and
   the work is ~N x (bucket size) dot products rather than N^2. Below `BRUTE_ROWS` segments every pair is
   compared. The copies of one file (`find_copies`) are the nearest segments of each of its segments, by
   the index's search.
2. **Aligned in time.** A copy matches the original at a fixed shift (a trimmed copy starts later, a
   re-encoded one at the same time): of the similar segment pairs of two files, those whose segments are
   each other's best match in the other file (`_mutual_best`) and whose time shift agrees to within half a
   segment with the most common shift are kept, and the pair of files is a copy when they cover at least
   `min_fraction` of the shorter file's segments (at least 2 segments, when both files have 2). Chance
   similarities between unrelated videos (alike scenes) pair segments at random shifts, and are dropped.

Files joined by copy pairs form a group; each pair says which span of each file matches.

The defaults are measured (`benchmarks/filters.py --copies`, docs/search.md): on copies made with ffmpeg from
the demo's videos, indexed with the demo's models, every threshold from 0.5 to 0.95 finds the same groups
(precision 1.0; the reciprocal ranks, not the cosines, separate copies there, as the demo's models put
unrelated clips at cosine 0.95 and more), and 0.98 starts losing copies; 0.9 bounds the pairs compared.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from stanvid.errors import QueryError

if TYPE_CHECKING:  # the index calls this module (`VideoIndex.duplicates`), so the import is one-way
    from stanvid.search.index import VideoIndex

__all__ = ["DEFAULT_THRESHOLD", "CopyGroup", "CopyMatch", "find_copies", "find_duplicates"]

DEFAULT_THRESHOLD = 0.9  # cosine of two segments of one footage (see the module docstring)
MIN_FRACTION = 0.3  # of the shorter file's segments that must line up
SPILL = 2  # cells each segment is compared in
BUCKET_ROWS = 256  # segments per bucket on average, for an index bucketed by its own k-means
BRUTE_ROWS = 8192  # below this, every pair of segments is compared
COPY_NEIGHBOURS = 32  # nearest segments looked at per segment by `find_copies`
RECIPROCAL = 7  # a pair counts when each segment is among the other's 7 most similar of other files


@dataclass(frozen=True)
class CopyMatch:
    """Two files that hold the same footage: the span of each that matches, at `shift` seconds (b - a)."""

    a: str  # path relative to the indexed folder
    a_file_id: int
    a_start: float
    a_end: float
    b: str
    b_file_id: int
    b_start: float
    b_end: float
    segments: int  # aligned similar segment pairs
    score: float  # their mean cosine
    shift: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CopyGroup:
    """Files joined by copy pairs (a copy of a copy is in its original's group), paths sorted."""

    files: list[str]
    file_ids: list[int]
    pairs: list[CopyMatch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "file_ids": self.file_ids, "pairs": [p.to_dict() for p in self.pairs]}


def _check(threshold: Any, min_fraction: Any) -> None:
    for name, value, low in (("threshold", threshold, -1.0), ("min_fraction", min_fraction, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low < value <= 1):
            raise QueryError(f"{name} must be a number in ({low:g}, 1], got {value!r}")


# ---------------------------------------------------------------------------------------------- the whole index
def find_duplicates(
    index: VideoIndex, threshold: float = DEFAULT_THRESHOLD, *, min_fraction: float = MIN_FRACTION
) -> list[CopyGroup]:
    """Every group of files of `index` that hold the same footage (see the module docstring), largest
    first; one generation of the index is read."""
    _check(threshold, min_fraction)
    with index.pinned() as view:
        table = _Segments.read(view)
        if len(table.file) == 0:
            return []
        pairs = _similar_pairs(table.vectors, table.file, _buckets(view, table.vectors), threshold)
        return _groups(table, _reciprocal(pairs), min_fraction)


@dataclass
class _Segments:
    """Every segment of one generation: its file (index into `paths`), start, end and vector (float16)."""

    file: np.ndarray  # (N,)
    start: np.ndarray  # (N,)
    end: np.ndarray  # (N,)
    vectors: np.ndarray  # (N, D) float16: half the memory; compared in float32 a bucket at a time
    paths: list[str]
    file_ids: list[int]
    counts: np.ndarray  # (F,) segments per file

    @classmethod
    def read(cls, index: VideoIndex) -> _Segments:
        files: dict[int, int] = {}
        paths, ids, fidx, starts, ends, parts = [], [], [], [], [], []
        for segs, vectors in index.iter_segments():
            for s in segs:
                if s.file_id not in files:
                    files[s.file_id] = len(paths)
                    paths.append(s.relpath)
                    ids.append(s.file_id)
                fidx.append(files[s.file_id])
                starts.append(s.start)
                ends.append(s.end)
            parts.append(vectors.astype(np.float16))
        file = np.array(fidx, dtype=np.int64)
        dim = index.meta["dim"]
        return cls(file, np.array(starts, np.float64), np.array(ends, np.float64),
                   np.concatenate(parts) if parts else np.zeros((0, dim), np.float16), paths, ids,
                   np.bincount(file, minlength=len(paths)))  # fmt: skip


def _buckets(index: VideoIndex, vectors: np.ndarray) -> list[np.ndarray]:
    """Row numbers per bucket (each row in up to `SPILL` of them)."""
    n = len(vectors)
    if n <= BRUTE_ROWS:
        return [np.arange(n)]
    main = getattr(index.vectors, "main", None)
    if main is not None:
        quantizer = faiss.extract_index_ivf(main).quantizer
    else:
        cells = max(2, n // BUCKET_ROWS)
        sample = vectors[np.random.default_rng(0).choice(n, size=min(n, 32 * cells), replace=False)]
        km = faiss.Kmeans(vectors.shape[1], cells, niter=10, spherical=True, seed=0)
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        quantizer.add(km.centroids)
    assign = np.concatenate([
        quantizer.search(np.ascontiguousarray(vectors[i : i + 65536], dtype=np.float32), SPILL)[1]
        for i in range(0, n, 65536)
    ])  # fmt: skip  # (N, SPILL)
    rows = np.repeat(np.arange(n), SPILL)
    cell = assign.ravel()
    keep = cell >= 0
    rows, cell = rows[keep], cell[keep]
    order = np.argsort(cell, kind="stable")
    bounds = np.flatnonzero(np.diff(cell[order])) + 1
    return [b for b in np.split(rows[order], bounds) if len(b) > 1]


def _similar_pairs(
    vectors: np.ndarray, file: np.ndarray, buckets: list[np.ndarray], threshold: float
) -> dict[tuple[int, int], float]:
    """{(row i, row j), i < j, different files: cosine} for the pairs above `threshold`: a FAISS range search
    of each bucket against itself, on one thread (thousands of small products: threads would only wait on
    each other)."""
    found: dict[tuple[int, int], float] = {}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for members in buckets:
            x = np.ascontiguousarray(vectors[members], dtype=np.float32)  # (m, D)
            flat = faiss.IndexFlatIP(x.shape[1])
            flat.add(x)
            lims, sims, cols = flat.range_search(x, threshold)
            rows = np.repeat(np.arange(len(members)), np.diff(lims.astype(np.int64)))
            a, b = members[rows], members[cols]
            keep = (a < b) & (file[a] != file[b])
            for i, j, v in zip(a[keep].tolist(), b[keep].tolist(), sims[keep].tolist(), strict=True):
                found[i, j] = v
    finally:
        faiss.omp_set_num_threads(threads)
    return found


def _reciprocal(pairs: dict[tuple[int, int], float], m: int = RECIPROCAL) -> dict[tuple[int, int], float]:
    """The pairs whose segments are among each other's `m` most similar segments of other files: what ranks
    a copy's segment is its footage, not the scale of the model's cosines (a weak or narrow model puts
    unrelated videos at 0.95 and their copies at 0.99; the copies still come first)."""
    if not pairs:
        return pairs
    ij = np.array(list(pairs), dtype=np.int64)  # (P, 2)
    sc = np.array(list(pairs.values()), dtype=np.float64)
    rows = np.concatenate([ij[:, 0], ij[:, 1]])  # both directions: (2P,)
    order = np.lexsort((-np.concatenate([sc, sc]), rows))
    ranked = rows[order]
    starts = np.searchsorted(ranked, ranked, side="left")
    rank = np.empty(len(rows), np.int64)
    rank[order] = np.arange(len(rows)) - starts
    near = rank < m
    keep = near[: len(sc)] & near[len(sc) :]
    return {(int(i), int(j)): float(v) for (i, j), v, k in zip(ij, sc, keep, strict=True) if k}


def _groups(table: _Segments, pairs: dict[tuple[int, int], float], min_fraction: float) -> list[CopyGroup]:
    by_files: dict[tuple[int, int], list[tuple[int, int, float]]] = defaultdict(list)
    for (i, j), score in pairs.items():
        fi, fj = int(table.file[i]), int(table.file[j])
        if table.paths[fi] > table.paths[fj]:
            i, j, fi, fj = j, i, fj, fi
        by_files[fi, fj].append((i, j, score))
    matches = [m for key, found in by_files.items() if (m := _aligned(table, key, found, min_fraction))]
    return _union(table, matches)


def _aligned(table: _Segments, files: tuple[int, int], found: list[tuple[int, int, float]],
             min_fraction: float) -> CopyMatch | None:  # fmt: skip
    """The copy match of two files from their similar segment pairs, if enough of them line up in time."""
    fa, fb = files
    found = _mutual_best(found)
    a = np.array([i for i, _, _ in found])
    b = np.array([j for _, j, _ in found])
    score = np.array([s for _, _, s in found])
    shift = table.start[b] - table.start[a]
    width = 0.5 * float(np.median(table.end[a] - table.start[a]))  # half a segment: one step of the grid
    order = np.argsort(shift)
    ordered = shift[order]
    ends = np.searchsorted(ordered, ordered + width, side="right")  # pairs within `width` of each other
    first = int(np.argmax(ends - np.arange(len(ordered))))
    picked = order[first : ends[first]]
    seg_a, seg_b = np.unique(a[picked]), np.unique(b[picked])
    shorter = int(min(table.counts[fa], table.counts[fb]))
    need = max(min(2, shorter), math.ceil(min_fraction * shorter))
    if min(len(seg_a), len(seg_b)) < need:
        return None
    return CopyMatch(
        table.paths[fa], table.file_ids[fa], float(table.start[seg_a].min()), float(table.end[seg_a].max()),
        table.paths[fb], table.file_ids[fb], float(table.start[seg_b].min()), float(table.end[seg_b].max()),
        int(min(len(seg_a), len(seg_b))), float(score[picked].mean()), float(np.median(shift[picked])),
    )  # fmt: skip


def _mutual_best(found: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """The pairs whose two segments are each other's most similar in the other file: a copy's segment finds
    its own moment, while the segments of two unrelated but alike videos (one scene, one topic) pair at
    random, and their time shifts then disagree."""
    best_a: dict[int, tuple[float, int]] = {}
    best_b: dict[int, tuple[float, int]] = {}
    for i, j, s in found:
        if s > best_a.get(i, (-2.0, -1))[0]:
            best_a[i] = (s, j)
        if s > best_b.get(j, (-2.0, -1))[0]:
            best_b[j] = (s, i)
    return [(i, j, s) for i, j, s in found if best_a[i][1] == j and best_b[j][1] == i]


def _union(table: _Segments, matches: list[CopyMatch]) -> list[CopyGroup]:
    index_of = {fid: i for i, fid in enumerate(table.file_ids)}
    parent = list(range(len(table.paths)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for m in matches:
        ra, rb = root(index_of[m.a_file_id]), root(index_of[m.b_file_id])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = defaultdict(list)
    pairs: dict[int, list[CopyMatch]] = defaultdict(list)
    for m in matches:
        pairs[root(index_of[m.a_file_id])].append(m)
    for r in pairs:
        members[r] = []
    for i in range(len(table.paths)):
        if root(i) in members:
            members[root(i)].append(i)
    groups = []
    for r, files in members.items():
        files.sort(key=lambda i: table.paths[i])
        groups.append(CopyGroup([table.paths[i] for i in files], [table.file_ids[i] for i in files],
                                sorted(pairs[r], key=lambda m: (m.a, m.b))))  # fmt: skip
    return sorted(groups, key=lambda g: (-len(g.files), g.files))


# ---------------------------------------------------------------------------------------------- one file
def find_copies(
    index: VideoIndex,
    file_id: int,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    min_fraction: float = MIN_FRACTION,
) -> list[CopyMatch]:
    """The files that hold footage of file `file_id` (each match with the file as `a`), best first: the
    nearest `COPY_NEIGHBOURS` segments of each of its segments, by the index's search, then aligned as in
    `find_duplicates`. An unknown id raises `QueryError`."""
    _check(threshold, min_fraction)
    with index.pinned() as view:
        segs, vectors = view.file_segments(int(file_id))
        if not segs:
            raise QueryError(f"{index.path}: no file with id {file_id}")
        hits = view.search_embeddings(vectors, COPY_NEIGHBOURS)
        others: dict[int, list] = defaultdict(list)
        for own, row in enumerate(hits):
            near = [h for h in row if h.file_id != segs[0].file_id][:RECIPROCAL]  # as `_reciprocal`, one way
            for h in near:
                if h.score >= threshold:
                    others[h.file_id].append((own, h))
        matches = []
        for fid, found in others.items():
            theirs, _ = view.file_segments(fid)
            table, pairs = _pair_table(segs, theirs, found)
            m = _aligned(table, (0, 1), pairs, min_fraction)
            if m is not None:
                matches.append(m)
        return sorted(matches, key=lambda m: (-m.segments, -m.score, m.b))


def _pair_table(mine: list, theirs: list, found: list) -> tuple[_Segments, list[tuple[int, int, float]]]:
    """The two files' segments as a `_Segments` (mine first) and the found pairs as its row numbers."""
    row_of = {s.id: len(mine) + k for k, s in enumerate(theirs)}
    both = [*mine, *theirs]
    table = _Segments(
        np.array([0] * len(mine) + [1] * len(theirs)), np.array([s.start for s in both], np.float64),
        np.array([s.end for s in both], np.float64), np.zeros((0, 1), np.float16),
        [mine[0].relpath, theirs[0].relpath], [mine[0].file_id, theirs[0].file_id],
        np.array([len(mine), len(theirs)]),
    )  # fmt: skip
    return table, [(own, row_of[h.id], h.score) for own, h in found if h.id in row_of]
