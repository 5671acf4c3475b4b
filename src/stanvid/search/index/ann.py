"""The vector index over the embedding store: which kind for which size, training it, searching it (with an
exact re-rank from the store), and measuring its recall against exact search.

Kinds, keyed by store slot (`stanvid.search.index.vectors`):

* `flat` — exact inner product over float32 copies of the live vectors. `auto` picks it below
  `approx_threshold` (100,000) vectors: 205 MB at 512-d, a query in a few milliseconds.
* `ivfpq` — what `auto` picks from `approx_threshold` on: an inverted file of `nlist` cells (k-means, spherical,
  `nlist` = 4 sqrt(N): the low end of FAISS's 4-16 sqrt(N) guidance, chosen for training time on a small CPU)
  holding product-quantized codes of the vectors (`m` = D/4 bytes each: 128 B at 512-d, 8 bytes of id beside),
  so 1M vectors take 136 MB instead of 2 GB (D/8-byte codes halve that but, on clustered data at 10M, rank
  the true neighbours too loosely for 400 re-ranked candidates to hold them: recall@10 0.76 against 0.998
  for D/4 at 300k vectors of the same density, measured). The best `rerank` candidates are scored again exactly with their
  float32 rows read from the store, so scores are exact cosines and the codes only choose whom to score. From
  1024 cells the centroids are trained in two levels (sqrt(nlist) coarse clusters, each split) and found the
  same way: an inverted file over the centroids, `QUANTIZER_PROBE` coarse clusters probed (~600 dot products
  per vector at 10M instead of 12,649: brute-force assignment of 10M vectors takes ~30 min on 2 cores).
* `ivf` — the same inverted file holding the float32 vectors themselves (`IndexIVFFlat`): 4 D bytes each.

`nprobe` (cells searched per query) is not a formula: after every build, `tune` measures recall@10 against
exact search (the whole store scanned for the truth) on two sets of 500 queries, the index's own vectors with
each query's own file left out of truth and answer, and queries drawn near indexed vectors, for growing
`nprobe`, and keeps the smallest whose recall clears the target (0.95) at the lower end of a 95 % confidence
interval on both sets; then the probes a filtered search adds (`filter_probe`) are measured the same way.
The figures are recorded and shown.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.search.index.vectors import READ_ROWS, VectorStore

log = logging.getLogger("stanvid")

ANN_KINDS = ("flat", "ivf", "ivfpq")

INDEX_KINDS = ("auto", *ANN_KINDS)

DEFAULT_APPROX_THRESHOLD = 100_000

TARGET_RECALL = 0.95

DEFAULT_RERANK = 100  # candidates scored exactly from the store per query (at least k)

RECALL_QUERIES = 500  # per query set (`tune`): the confidence interval's half-width ~0.005 at recall 0.96

TWO_LEVEL_FROM_NLIST = 1024  # centroids trained and found in two levels from this many cells

QUANTIZER_PROBE = 4  # coarse clusters probed to assign a vector to its cell (queries probe more: `_params`)

_THREADS = faiss.omp_get_max_threads()


def _threads_for(queries: np.ndarray) -> None:
    """One OpenMP thread for a few queries (the calling thread's setting only): a single query gains nothing
    from a second thread and, on a busy machine, loses ~10x to the threads waiting on each other (3 ms
    against 25-33 ms for 20k exact vectors measured on 2 shared cores)."""
    faiss.omp_set_num_threads(1 if len(queries) < 8 else _THREADS)


MAX_PROBE_FRACTION = 8  # `nprobe` is chosen up to nlist / 8 (or 64 cells); a user's --nprobe may go past

_NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


# ---------------------------------------------------------------------------------------------- parameters
def choose_kind(kind: str, n: int, approx_threshold: int) -> str:
    if kind not in INDEX_KINDS:
        raise VideoIndexError(f"vector index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "ivfpq" if n >= approx_threshold else "flat"
    return kind


def choose_params(kind: str, n: int, dim: int, nlist: int | None = None) -> dict[str, Any]:
    """The shape of an approximate index over `n` vectors of `dim`: cells, code size, quantizer."""
    cells = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    cells = max(1, min(cells, n))
    params: dict[str, Any] = {"kind": kind, "nlist": int(cells), "two_level": cells >= TWO_LEVEL_FROM_NLIST}
    if kind == "ivfpq":
        m = max([d for d in range(1, dim + 1) if dim % d == 0 and dim // d >= 4] or [1])
        params["m"] = m
        params["nbits"] = int(min(8, max(1, math.floor(math.log2(max(2, n / 4))))))
    return params


def describe(record: dict[str, Any] | None) -> str:
    """One line for the summary: kind, parameters and the measured recall."""
    if not record or record.get("kind") == "flat":
        return "exact inner product"
    shape = f"nlist={record['nlist']}"
    if record["kind"] == "ivfpq":
        shape += f", PQ {record['m']}x{record['nbits']} bit codes, {record['rerank']} re-ranked exactly"
    measured, low = record.get("recall_at_10"), record.get("recall_at_10_low")
    if measured is None:
        recall = ""
    elif low is None:  # recorded before the confidence interval was
        recall = f", recall@10 {measured:.3f} vs exact on {record['recall_queries']} of its vectors"
    else:
        recall = (
            f", recall@10 {measured:.3f} (>= {low:.3f} at 95% confidence) vs exact on 2 x "
            f"{record['recall_queries']} queries (held-out files, near points)"
        )
    if measured is not None and (measured if low is None else low) < record.get("target_recall", 0):
        recall += f" (target {record['target_recall']:.2f} not reached)"
    if record.get("filter_recall_at_10") is not None:
        recall += (
            f"; filtered to {record['filter_fraction']:.0%}: recall@10 {record['filter_recall_at_10']:.3f} "
            f"(>= {record['filter_recall_at_10_low']:.3f})"
        )
    name = "IVF-PQ" if record["kind"] == "ivfpq" else "IVF"
    return f"approximate {name}, {shape}, nprobe={record['nprobe']}{recall}"


# ---------------------------------------------------------------------------------------------- training
def _kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """(k, D) unit centroids of the rows of `x` (spherical k-means; the points themselves when k >= n)."""
    if k >= len(x):
        return _unit(x[:k].copy())
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 20)  # fmt: skip
    km.train(np.ascontiguousarray(x))
    return km.centroids


def _centroids(x: np.ndarray, k: int, seed: int, two_level: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """k unit centroids of a training sample, and with `two_level` the sqrt(k) coarse ones they were split
    from (each coarse cluster into centroids in proportion to its points): ~sqrt(k) times cheaper than one
    k-means, and the coarse level finds a vector's cell later."""
    if not two_level:
        return _kmeans(x, k, seed, niter=20), None
    k1 = int(math.sqrt(k))
    top = _kmeans(x, k1, seed, niter=20)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(top)
    assign = flat.search(x, 1)[1][:, 0]
    sizes = np.bincount(assign, minlength=k1)
    share = np.minimum(sizes, np.floor(k * sizes / sizes.sum()).astype(np.int64))
    spare = np.argsort(-(k * sizes / sizes.sum() - share), kind="stable")
    while share.sum() < k:  # the remainder to the largest fractions, never more centroids than points
        for c in spare:
            if share.sum() >= k:
                break
            if share[c] < sizes[c]:
                share[c] += 1
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = [
        _kmeans(x[order[bounds[c] : bounds[c + 1]]], int(share[c]), seed + c, niter=10)
        for c in range(k1)
        if share[c] > 0
    ]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32), top


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def train_empty(sample: np.ndarray, params: dict[str, Any], seed: int = 0) -> faiss.Index:
    """An empty, trained IVF / IVF-PQ index for `params` (`choose_params`), from (n, D) unit vectors."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    dim = sample.shape[1]
    centroids, coarse = _centroids(sample, params["nlist"], seed, params.get("two_level", False))
    if coarse is not None:  # an inverted file over the centroids themselves
        top = faiss.IndexFlatIP(dim)
        top.add(coarse)
        quantizer = faiss.IndexIVFFlat(top, dim, len(coarse), faiss.METRIC_INNER_PRODUCT)
        quantizer.own_fields = True
        top.this.disown()
        quantizer.nprobe = QUANTIZER_PROBE
    else:
        quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    if coarse is not None:
        quantizer.make_direct_map()  # residuals need each centroid back by its id
    nlist = quantizer.ntotal
    if params["kind"] == "ivfpq":
        index = faiss.IndexIVFPQ(
            quantizer, dim, nlist, params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
        )
        index.pq.cp.min_points_per_centroid = 1  # small indexes train fewer codes (nbits) rather than warn
        index.pq.cp.niter = 10  # 64 points per code word, 10 iterations: seconds, not minutes, at 512-d
        index.train(sample[: 64 << params["nbits"]])  # the coarse cells are trained already
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample[:1])
    index.own_fields = True
    quantizer.this.disown()
    return index


def fit(index: faiss.Index, vectors: np.ndarray) -> float:
    """Mean cosine of `vectors` to their nearest cell centre: how well the trained cells fit them."""
    if len(vectors) == 0:
        return 1.0
    ivf = faiss.extract_index_ivf(index)
    return float(ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)[0].mean())


def make_vector_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    kind: str = "auto",
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
    nlist: int | None = None,
    nprobe: int | None = None,
) -> faiss.Index:
    """A FAISS inner-product index over `vectors` (N, D) float32 with int64 `ids` (N,), in memory.

    `kind`: "flat" (exact), "ivf" (inverted file of float32 vectors), "ivfpq" (inverted file of PQ codes), or
    "auto" (flat below `approx_threshold` vectors, ivfpq above). Cells and codes as `choose_params`; `nprobe`
    defaults to nlist / 16 here (`stanvid index` measures it instead, see the module docstring).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"vectors must be (N, D) with N ids, got {vectors.shape} and {ids.shape} ids")
    n, dim = vectors.shape
    kind = choose_kind(kind, n, approx_threshold)
    if kind == "flat" or n == 0:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        params = choose_params(kind, n, dim, nlist)
        sample = np.random.default_rng(0).choice(n, size=min(n, 64 * params["nlist"]), replace=False)
        index = train_empty(vectors[np.sort(sample)], params)
        index.nprobe = min(index.nlist, nprobe or max(1, index.nlist // 16))
    if n:
        index.add_with_ids(vectors, ids)
    return index


def add_live(index: faiss.Index, store: VectorStore, mask: np.ndarray, start: int = 0) -> None:
    """Add the live rows of the store from slot `start` to `index`, keyed by slot, a chunk at a time."""
    for first, block in store.chunks(READ_ROWS, start):
        keep = mask[first : first + len(block)]
        if keep.any():
            index.add_with_ids(block[keep], np.flatnonzero(keep).astype(np.int64) + first)


# ---------------------------------------------------------------------------------------------- filtering
EXACT_FILTER_ROWS = 4_096  # a filter keeping at most this many rows is answered by an exact scan of them
# (their vectors read once and kept with the filter: 8 MB at 512-d; past this, reading them costs more than
# the IVF search with the filter inside, measured by benchmarks/filters.py)


class AllowedRows:
    """The store slots a filtered search may return (sorted, live rows only) and FAISS's selector over them:
    a bitmap of the store's rows, so the filter is applied inside the search (as deletions are) and `k`
    hits come back whenever `k` rows pass."""

    def __init__(self, slots: np.ndarray, rows: int, live: int) -> None:
        self.slots = np.ascontiguousarray(slots, dtype=np.int64)
        self.count = len(self.slots)
        self.fraction = self.count / max(1, live)
        self.flat: faiss.Index | None = None  # the rows of a small filter, exact, read on first use
        bits = np.zeros(max(rows, 1), dtype=bool)
        bits[self.slots] = True
        self.bitmap = np.packbits(bits, bitorder="little")  # bit i of byte i >> 3: FAISS's layout
        self.selector = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))


def search_allowed(
    searcher: Any, store: VectorStore, queries: np.ndarray, k: int, allowed: AllowedRows | None
) -> tuple[np.ndarray, np.ndarray]:
    """`searcher.search(queries, k)` restricted to `allowed` (None: every live row): an exact scan of the
    allowed rows when they are few (`EXACT_FILTER_ROWS`), the vector index with the filter inside otherwise."""
    if allowed is None:
        return searcher.search(queries, k)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if allowed.count == 0:
        empty = np.zeros((len(queries), 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    if allowed.count <= EXACT_FILTER_ROWS:
        if allowed.flat is None:
            flat = faiss.IndexFlatIP(store.dim)
            flat.add(store.read(allowed.slots))
            allowed.flat = flat
        _threads_for(queries)  # (numpy's BLAS would start its threads for a few thousand rows: ~30 ms loaded)
        scores, found = allowed.flat.search(queries, min(k, allowed.count))
        return scores, np.where(found >= 0, allowed.slots[np.maximum(found, 0)], -1)
    return searcher.search(queries, k, allowed=allowed)


# ---------------------------------------------------------------------------------------------- searching
class ExactSearcher:
    """Exact search: float32 copies of the live vectors in memory (the `flat` kind)."""

    kind = "flat"

    def __init__(self, store: VectorStore, mask: np.ndarray, previous: ExactSearcher | None = None) -> None:
        """`previous`: the searcher of an earlier state of the same store (same file and epoch: slots are
        only ever appended), copied and brought up to `mask` rather than read again: the rows deleted since
        removed, the rows appended since added."""
        old = None if previous is None else previous.mask
        if old is not None and len(old) <= len(mask) and not (mask[: len(old)] & ~old).any():
            self.index = faiss.clone_index(previous.index)
            gone = np.flatnonzero(old & ~mask[: len(old)])
            if len(gone):
                self.index.remove_ids(faiss.IDSelectorBatch(gone.astype(np.int64)))
            add_live(self.index, store, mask, start=len(old))
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(store.dim))
            add_live(self.index, store, mask)
        self.mask = mask
        self.count = int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, allowed: AllowedRows | None = None, **_: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        _threads_for(queries)
        if allowed is None:
            return self.index.search(queries, max(1, min(k, self.count)))
        params = faiss.SearchParameters(sel=allowed.selector)
        return self.index.search(queries, max(1, min(k, allowed.count)), params=params)


class ScanSearcher:
    """Exact search by scanning the memory-mapped store in chunks: what a large index answers with while its
    vector index file is missing or damaged (correct, memory-bounded, slow)."""

    kind = "scan"

    def __init__(self, store: VectorStore, mask: np.ndarray) -> None:
        self.store, self.mask = store, mask
        self.count = int(mask.sum())

    def search(
        self, queries: np.ndarray, k: int, allowed: AllowedRows | None = None, **_: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            return exact_rows(self.store, allowed.slots, queries, max(1, min(k, allowed.count)))
        return exact_top(self.store, self.mask, queries, max(1, min(k, self.count)))


def recorded_files(record: dict[str, Any]) -> tuple:
    """The vector index files a record names, with their hashes: two records with the same tuple name the same
    files (named files never change), so a searcher of one serves the other's main file and trained index."""
    return tuple(record.get(key) for key in ("file", "sha256", "bytes", "trained", "trained_sha256"))


class MappedFile:
    """A vector index file FAISS has memory-mapped, watched through a descriptor of its own: FAISS reads the
    pages as a search touches them, so bytes written into the file in place (a copy over it, an editor) would
    be searched as index data (slots no row holds, or a fault past a truncated end). A file renamed over the
    name, or unlinked, leaves this inode as it was: only its link count and ctime move."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (held while the map is: closed with the searcher)
        self._base = self._identity()

    def _identity(self) -> tuple[int, int, int, int]:
        st = os.fstat(self._file.fileno())
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink

    def changed(self) -> bool:
        """Whether the mapped file was written since it was mapped (size or mtime, or ctime with the same
        number of links: a rename or unlink changes the links)."""
        size, mtime, ctime, links = self._identity()
        base = self._base
        return (size, mtime) != base[:2] or (ctime != base[2] and links == base[3])


class ApproxSearcher:
    """An IVF / IVF-PQ main index (memory-mapped), the delta of vectors added since it was written (an index
    trained as the main one, in memory), the slots deleted since (filtered inside the search, so `k` live
    hits come back), and the exact re-rank of the candidates from the store."""

    def __init__(self, main: faiss.Index, delta: faiss.Index | None, tombstones: np.ndarray,
                 store: VectorStore, record: dict[str, Any], count: int, trained: Any = None,
                 delta_slots: np.ndarray | None = None, watch: MappedFile | None = None) -> None:  # fmt: skip
        self.main, self.delta, self.store = main, delta, store
        self.watch = watch  # the main file, when it is memory-mapped
        self.main_slots = int(record.get("slots", count))
        self.fallback: ScanSearcher | None = None  # exact search, once the mapped file is not to be trusted
        self.trained = trained  # the empty trained index, serialized: the next state's delta starts from it
        self.delta_slots = (
            delta_slots  # the slots the delta holds (sorted), for the next state's to start from
        )
        self.files = recorded_files(record)
        self.kind = record["kind"]
        self.nprobe, self.rerank = int(record.get("nprobe") or 1), int(record.get("rerank") or DEFAULT_RERANK)
        self.two_level = bool(record.get("two_level"))
        self.filter_power = float(record.get("filter_power") or FILTER_PROBE_POWER)
        self.nlist = faiss.extract_index_ivf(main).nlist
        self.count = count
        self._keep: list[Any] = []
        self.tombstones = np.asarray(tombstones, dtype=np.int64)
        self.selector = None
        if len(tombstones):
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(tombstones, dtype=np.int64))
            self.selector = faiss.IDSelectorNot(batch)
            self._keep.append(batch)

    def _params(
        self,
        nprobe: int,
        filtered: bool,
        exclude: np.ndarray | None = None,
        allowed: AllowedRows | None = None,
    ) -> faiss.SearchParametersIVF:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if allowed is not None:  # the allowed rows are live rows: the deletions are in them already
            params.sel = allowed.selector
        elif exclude is not None and len(exclude):  # a query's own file left out (recall measurement)
            batch = faiss.IDSelectorBatch(np.union1d(exclude, self.tombstones).astype(np.int64))
            selector = faiss.IDSelectorNot(batch)
            params.sel = selector
            params._refs = (batch, selector)  # the parameters hold raw pointers: keep the objects alive
        elif filtered and self.selector is not None:
            params.sel = self.selector
        if self.two_level:
            quantizer = faiss.SearchParametersIVF()
            quantizer.nprobe = max(2 * QUANTIZER_PROBE, nprobe // 2)
            params.quantizer_params = quantizer
            params._quantizer_ref = quantizer  # kept alive with the parameters
        return params

    def candidates(
        self,
        queries: np.ndarray,
        r: int,
        nprobe: int,
        exclude: np.ndarray | None = None,
        allowed: AllowedRows | None = None,
    ) -> np.ndarray:
        """(Q, <= 2 r) candidate slots (-1 padded) from the main index and the delta, each part in the order
        of its approximate scores."""
        found = [self.main.search(queries, r, params=self._params(nprobe, True, exclude, allowed))[1]]
        if self.delta is not None and self.delta.ntotal:
            params = self._params(nprobe, False, allowed=allowed)
            found.append(self.delta.search(queries, min(r, self.delta.ntotal), params=params)[1])
        return np.concatenate(found, axis=1)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, rerank: int | None = None,
               widen: bool = True, exclude: np.ndarray | None = None,
               allowed: AllowedRows | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(Q, k') exact scores and slots, k' = min(k, live vectors), -1 where fewer were found. With `widen`,
        a query that found fewer than k' probes twice the cells until it has them (small or skewed cells).
        `exclude`: slots left out of the main index's answer (the recall measurement's own file).
        `allowed`: only these rows may be returned (a filter, applied inside the search, see `filter_probe`).

        Past `rerank` results (deep pages), the candidates are taken in tiers of doubling depth (`tiers`):
        a candidate ranks by its tier first, then by its exact score, so the first n results of any deeper
        search are the first n of a shallower one and pages never repeat or skip a hit.

        A main file written in place since it was mapped (`MappedFile.changed`), or a candidate no row holds,
        turns this searcher into exact search over the store (`fall_back`), with a warning."""
        if self.fallback is None and self.changed():
            self.fall_back(f"{self.watch.path} was written in place while mapped")
        if self.fallback is not None:
            return self.fallback.search(queries, k, allowed)
        try:
            return self._search(queries, k, nprobe, rerank, widen, exclude, allowed)
        except IndexError as exc:  # a slot out of the store: the mapped file is not the one checked
            self.fall_back(str(exc))
            return self.fallback.search(queries, k, allowed)

    def changed(self) -> bool:
        return self.watch is not None and self.watch.changed()

    def fall_back(self, why: str) -> None:
        """Answer by exact search over the store's live rows from now on (this generation's: the main file's
        slots but the deleted ones, and the delta's)."""
        mask = np.zeros(self.store.rows, bool)
        mask[: self.main_slots] = True
        mask[self.tombstones] = False
        if self.delta_slots is not None:
            mask[self.delta_slots] = True
        log.warning("%s; searching exactly instead; re-run `stanvid index` to store it again", why)
        self.fallback = ScanSearcher(self.store, mask)

    def _search(self, queries: np.ndarray, k: int, nprobe: int | None, rerank: int | None, widen: bool,
                exclude: np.ndarray | None, allowed: AllowedRows | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _threads_for(queries)
        want = max(1, min(k, self.count if allowed is None else allowed.count))
        nprobe = min(self.nlist, nprobe or self.nprobe)
        if allowed is not None:
            nprobe = filter_probe(nprobe, allowed.fraction, self.nlist, self.filter_power)
        base = max(1, rerank or self.rerank)
        r = base if want <= base else base << math.ceil(math.log2(want / base))
        while True:
            cand = self.candidates(queries, r, nprobe, exclude, allowed)
            scores, slots = rerank_exact(self.store, queries, cand, want, tiers(cand.shape[1], r, base))
            if not widen or nprobe >= self.nlist or (slots >= 0).sum(axis=1).min() >= want:
                return scores, slots
            nprobe = min(self.nlist, 2 * nprobe)


FILTER_PROBE_POWER = 0.5  # a filter keeping a fraction f of the rows probes nprobe / f**0.5 cells (default)


def filter_probe(nprobe: int, fraction: float, nlist: int, power: float = FILTER_PROBE_POWER) -> int:
    """The cells a filtered search probes: the k nearest allowed rows of a filter keeping a fraction `f` lie
    about as far as the k / f nearest of all, in more cells, so the probes grow as f ** -power; `tune`
    measures which power keeps the recall and records it (`filter_power`)."""
    if fraction >= 1:
        return nprobe
    return int(min(nlist, math.ceil(nprobe * max(fraction, 1e-9) ** -power)))


def tiers(width: int, r: int, base: int) -> np.ndarray | None:
    """(width,) the tier of each candidate column (the main index's r columns, then the delta's): 0 for the
    first `base` of each part, t for positions in [base 2^(t-1), base 2^t); None when r == base (one tier)."""
    if r <= base:
        return None
    pos = np.arange(width) % r
    return np.where(pos < base, 0, np.ceil(np.log2((pos + 1) / base))).astype(np.int64)


def rerank_exact(
    store: VectorStore, queries: np.ndarray, cand: np.ndarray, k: int, tier: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Score each query's candidate slots exactly from the store and keep the best k, best first (by `tier`
    first when given: (width,) per candidate column, see `tiers`)."""
    q = len(queries)
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    uniq = np.unique(cand[cand >= 0])
    if len(uniq) == 0:
        return out_s, out_i
    scores = store.read(uniq) @ queries.T  # (U, Q)
    for row in range(q):
        valid = cand[row] >= 0
        mine, first = np.unique(cand[row][valid], return_index=True)
        s = scores[np.searchsorted(uniq, mine), row]
        rank = np.zeros(len(mine), np.int64) if tier is None else tier[valid][first]
        order = np.lexsort((mine, -s, rank))[:k]
        out_s[row, : len(order)], out_i[row, : len(order)] = s[order], mine[order]
    return out_s, out_i


def exact_rows(
    store: VectorStore, slots: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) exact best scores and slots among `slots` (sorted) only, reading just those rows (what a store
    without a vector index answers a filtered search with)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for at in range(0, len(slots), READ_ROWS):
        part = slots[at : at + READ_ROWS]
        s = queries @ store.read(part).T  # (Q, n)
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]  # (Q, kk): only these can enter the best k
        all_s = np.concatenate([best_s, np.take_along_axis(s, top, axis=1)], axis=1)
        all_i = np.concatenate([best_i, part[top]], axis=1)
        order = _rank_rows(all_s, all_i)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, axis=1), np.take_along_axis(all_i, order, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def exact_top(
    store: VectorStore, mask: np.ndarray, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) exact best scores and slots over the live rows of the store, streamed a chunk at a time;
    `exclude[i]` (sorted slots) are left out for query i."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for first, block in store.chunks():
        s = queries @ block.T  # (Q, n)
        s[:, ~mask[first : first + len(block)]] = -np.inf
        for i, slots in enumerate(exclude or []):
            lo, hi = np.searchsorted(slots, [first, first + len(block)])
            s[i, slots[lo:hi] - first] = -np.inf
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        all_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        all_i = np.concatenate([best_i, part + first], axis=1)
        order = _rank_rows(all_s, all_i)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, axis=1), np.take_along_axis(all_i, order, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def _rank_rows(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the column order by score descending, ties by id."""
    return np.stack([np.lexsort((i, -s)) for s, i in zip(scores, ids, strict=True)])


# ---------------------------------------------------------------------------------------------- recall
NEAR_COSINE = 0.85  # a near-point query's cosine to the indexed vector it was drawn around

CONFIDENCE_Z = 1.645  # one-sided 95 %: the chosen nprobe's recall is below the target 1 time in 20 at most

FILTER_POWERS = (0.5, 0.75, 1.0)  # tried in turn until the filtered recall's lower bound clears the target

SCREEN_QUERIES = 100  # per set: an nprobe whose recall on these is SCREEN_MARGIN below the target is skipped
SCREEN_MARGIN = 0.02  # (about 2 standard errors at 100 queries: a step that could pass is measured in full)

FILTER_BLOCK = 64  # the tuner's filter keeps whole runs of slots (a file's segments are consecutive slots)


def lower_bound(per_query: np.ndarray) -> float:
    """The lower end of the one-sided 95 % confidence interval on the mean of per-query recalls."""
    n = len(per_query)
    if n < 2:
        return float(per_query.mean()) if n else 0.0
    return float(per_query.mean() - CONFIDENCE_Z * per_query.std(ddof=1) / math.sqrt(n))


def near_points(points: np.ndarray, rng: np.random.Generator, cosine: float = NEAR_COSINE) -> np.ndarray:
    """Unit queries at `cosine` to each of `points` (unit rows), in a random direction: what a user's query
    looks like to the index (near what is indexed, but not any indexed vector)."""
    noise = rng.standard_normal(points.shape).astype(np.float32)
    noise -= (noise * points).sum(axis=1, keepdims=True) * points  # (n, D) orthogonal to each point
    return _unit(cosine * points + math.sqrt(1 - cosine**2) * _unit(noise))


def _per_query(searcher: ApproxSearcher, q: np.ndarray, exclude: list[np.ndarray], truth: np.ndarray, p: int,
               r: int, allowed: AllowedRows | None = None) -> np.ndarray:  # fmt: skip
    """(Q,) recall@10 of each query against its exact top 10."""
    out = np.zeros(len(q))
    for i in range(len(q)):
        got = searcher.search(q[i : i + 1], 10, nprobe=p, rerank=r, widen=False, allowed=allowed,
                              exclude=exclude[i] if len(exclude[i]) else None)[1][0]  # fmt: skip
        t = truth[i][truth[i] >= 0]
        out[i] = len(set(got[got >= 0].tolist()) & set(t.tolist())) / max(1, len(t))
    return out


def tune(
    searcher: ApproxSearcher,
    store: VectorStore,
    mask: np.ndarray,
    *,
    target: float = TARGET_RECALL,
    nprobe: int | None = None,
    rerank: int | None = None,
    queries: int = RECALL_QUERIES,
    seed: int = 0,
    same_file: Any = None,
) -> dict[str, Any]:
    """The smallest `nprobe` (and `rerank`) whose recall@10 against exact search clears `target` at the lower
    end of a one-sided 95 % confidence interval (`lower_bound`), on two sets of `queries` each, the truth an
    exact scan of the store:

    * held-out file: the index's own vectors, each query's file (`same_file(slots)`) left out of the truth and
      the answer, so what is measured is finding other videos (a file's own segments share its cell);
    * near points: queries drawn at cosine `NEAR_COSINE` around indexed vectors (`near_points`), nothing left
      out: the queries users send land near what is indexed, not on it.

    A point estimate crossing the target stops at the first `nprobe` whose noise lands above it, and the
    recall users get is then below the target about half the time; the lower bound is what is guaranteed.
    Each `nprobe` is first measured on `SCREEN_QUERIES` of each set, and only in full when that is within
    `SCREEN_MARGIN` of the target (the ladder's low steps cost a tenth).
    Then the filtered search (`filter_probe`) is measured on the near-point queries with a filter keeping a
    tenth of the rows (at most: fewer on large indexes, down to the size exact scans take over), and the
    smallest probe growth (`FILTER_POWERS`) whose lower bound clears the target is recorded. A fixed
    `nprobe` (the user's) is measured, not searched. Returns {nprobe, rerank, recall_at_10, ...}."""
    live = np.flatnonzero(mask)
    count = min(queries, len(live))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(live, size=count, replace=False))
    exclude = same_file(chosen) if same_file is not None else [np.zeros(0, np.int64)] * count
    near = near_points(store.read(np.sort(rng.choice(live, size=count, replace=False))), rng)
    q = np.concatenate([store.read(chosen), near])
    exclude = [*exclude, *[np.zeros(0, np.int64)] * count]
    truth = exact_top(store, mask, q, 10, exclude)[1]

    base = rerank or DEFAULT_RERANK
    cap = max(min(searcher.nlist, 64), searcher.nlist // MAX_PROBE_FRACTION)  # milliseconds: at most 1/8
    ladder = sorted({p for p in _NPROBE_LADDER if p < cap} | {cap})
    tried: list[tuple[float, int, int, np.ndarray]] = []
    chosen_one = None
    for r in (base,) if nprobe or rerank or searcher.kind == "ivf" else (base, 4 * base):
        best, flat = 0.0, 0
        for p in (nprobe,) if nprobe else ladder:
            screen = (
                np.r_[0:SCREEN_QUERIES, count : count + SCREEN_QUERIES] if count > SCREEN_QUERIES else None
            )
            if screen is not None and not nprobe:  # a step far below the target is not measured in full
                part = _per_query(searcher, q[screen], [exclude[i] for i in screen], truth[screen], p, r)
                if min(part[:SCREEN_QUERIES].mean(), part[SCREEN_QUERIES:].mean()) < target - SCREEN_MARGIN:
                    low = min(lower_bound(part[:SCREEN_QUERIES]), lower_bound(part[SCREEN_QUERIES:]))
                    tried.append((low, p, r, None))
                    flat = flat + 1 if low <= best + 0.002 else 0
                    best = max(best, low)
                    continue
            per = _per_query(searcher, q, exclude, truth, p, r)
            low = min(lower_bound(per[:count]), lower_bound(per[count:]))
            tried.append((low, p, r, per))
            if low >= target:
                chosen_one = tried[-1]
                break
            flat = flat + 1 if low <= best + 0.002 else 0
            best = max(best, low)
            if flat >= 3 and p >= 32:  # more cells stopped helping: the codes limit recall, not the probes
                break
        if chosen_one is not None:
            break
    low, p, r, per = chosen_one or max(tried, key=lambda t: (t[0], -t[1], -t[2]))
    if per is None:  # the best of the steps that fell short was only screened: measured in full now
        per = _per_query(searcher, q, exclude, truth, p, r)
        low = min(lower_bound(per[:count]), lower_bound(per[count:]))
    record = {
        "nprobe": p,
        "rerank": r,
        "recall_at_10": float(min(per[:count].mean(), per[count:].mean())),
        "recall_at_10_low": low,
        "recall_held_out": float(per[:count].mean()),
        "recall_near": float(per[count:].mean()),
        "recall_queries": count,
        "target_recall": target,
    }
    record.update(_tune_filtered(searcher, store, mask, near, p, r, target, rng))
    return record


def _tune_filtered(searcher: ApproxSearcher, store: VectorStore, mask: np.ndarray, q: np.ndarray, p: int, r: int,
                   target: float, rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """The probe growth a filtered search needs to keep the recall (see `tune`), measured."""
    live = int(mask.sum())
    fraction = min(0.1, max(0.02, 2 * EXACT_FILTER_ROWS / max(1, live)))
    blocks = rng.random(-(-len(mask) // FILTER_BLOCK)) < fraction
    keep = np.repeat(blocks, FILTER_BLOCK)[: len(mask)] & mask
    if not keep.any():
        return {}
    allowed = AllowedRows(np.flatnonzero(keep), len(mask), live)
    truth = exact_top(store, keep, q, 10)[1]
    none = [np.zeros(0, np.int64)] * len(q)
    old = searcher.filter_power
    best: tuple[float, float, float] = (-1.0, 0.0, FILTER_POWERS[-1])
    try:
        for power in FILTER_POWERS:
            searcher.filter_power = power
            per = _per_query(searcher, q, none, truth, p, r, allowed)
            best = max(best, (lower_bound(per), float(per.mean()), power), key=lambda t: t[0])
            if lower_bound(per) >= target:
                best = (lower_bound(per), float(per.mean()), power)
                break
    finally:
        searcher.filter_power = old
    return {"filter_power": best[2], "filter_recall_at_10": best[1], "filter_recall_at_10_low": best[0],
            "filter_fraction": round(allowed.fraction, 4)}  # fmt: skip
