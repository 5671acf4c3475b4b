"""Search your own videos: an embedding index over a folder, FAISS for vectors and SQLite for everything else.

An index is a directory:

    INDEX/index.sqlite          files (path, size, mtime, duration, fps, ...), segments (file, start, end,
                                embedding), the model identity and the settings it was built with
    INDEX/vectors-<gen>.faiss   the FAISS index over the segment embeddings, for generation <gen> of the rows
    INDEX/shards/               per-rank SQLite files while a `torchrun` build is under way

SQLite is the source of truth: embeddings are committed there with their metadata, a few files at a time (a
file's segments always in the same transaction as its row), so an interrupted run keeps everything committed.
Every commit that changes the segments bumps a generation counter; the FAISS file carries the generation in its
name and is written to a temporary file and renamed, so it is either the one for the current rows or absent, and
an absent one is rebuilt from SQLite (at the end of the next run, or in memory when opening).

Embeddings are L2-normalized, so the FAISS inner product is the cosine similarity CLIP ranks by. The vector
index is exact (`IndexFlatIP`) up to `approx_threshold` vectors and an inverted file (`IndexIVFFlat`) above:
it needs no graph to maintain, trains in seconds on a sample and its `nprobe` trades recall for speed
(benchmarks/index.py measures both at 10k and 1M vectors).

The model that built the index is recorded (its source and a SHA-256 of its config and weights); a query with
any other model is refused, because its text embeddings would live in another space and rank at random.
The precision it encoded in (`stanvid.precision`) is recorded too, and only informs: embeddings are stored as
float32 whatever it was, and a query in another precision with the same model lands in the same space (the
tests bound the drift).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stanvid.errors import StanvidError, VideoReadError
from stanvid.model import VideoCLIP
from stanvid.pipeline import PREFETCH_PER_WORKER, ThreadBudget, encode_batch_size, thread_budget
from stanvid.precision import InferencePrecision, prepare_for_inference, resolve_precision
from stanvid.sampling import uniform_indices
from stanvid.transforms import center_crop, normalize, resize_short_side

log = logging.getLogger("stanvid")

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoIndexError",
    "IndexReport",
    "SearchResult",
    "Segment",
    "VideoIndex",
    "build_index",
    "make_vector_index",
    "model_fingerprint",
    "open_index",
    "search_index",
    "segment_bounds",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
DB_NAME = "index.sqlite"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
DEFAULT_APPROX_THRESHOLD = 100_000
INDEX_KINDS = ("auto", "flat", "ivf")


class VideoIndexError(StanvidError):
    """The index is missing, was built differently (model, root, segments), or a query does not fit it."""


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SearchResult:
    """One hit: a segment of a video, its time span in seconds and its cosine similarity to the query."""

    id: int  # segment id (stable across updates of other files)
    file_id: int
    path: str  # absolute path of the video
    relpath: str  # path relative to the indexed folder
    start: float
    end: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Segment:
    """A segment row with what is needed to read its frames."""

    id: int
    file_id: int
    path: str
    relpath: str
    start: float
    end: float
    fps: float
    num_frames: int
    width: int
    height: int
    size: int
    mtime_ns: int


@dataclass
class IndexReport:
    """What a `build_index` run did (on rank 0 of a sharded run: for all ranks)."""

    index: str
    files_seen: int = 0
    indexed: int = 0  # files newly (re-)encoded by this run
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    files: int = 0  # files in the index at the end
    segments: int = 0  # segments in the index at the end
    vector_index: str = ""
    seconds: float = 0.0
    precision: str = ""  # what this run encoded in (resolved: fp32, bf16, fp16, int8)
    built_precision: str = (
        ""  # what the stored embeddings were computed in ("bf16", or "fp32+bf16" when mixed)
    )

    def summary(self) -> str:
        built = f", built in {self.built_precision}" if self.built_precision else ""
        lines = [
            f"{self.index}: {self.files} videos, {self.segments} segments ({self.vector_index}{built}); this run: "
            f"{self.indexed} indexed, {self.unchanged} unchanged, {self.removed} removed, {len(self.failed)} "
            f"unreadable, {self.seconds:.1f} s, precision {self.precision}"
        ]
        if self.failed:
            lines.append("unreadable videos (not indexed):")
            lines += [f"  {path}: {error}" for path, error in self.failed]
        return "\n".join(lines)


@dataclass(frozen=True)
class _FileEntry:
    relpath: str
    size: int
    mtime_ns: int


# ---------------------------------------------------------------------------------------------- model identity
def model_fingerprint(model: VideoCLIP) -> str:
    """SHA-256 of the model's config and weights: two models with the same fingerprint embed identically.

    `name` and `grad_checkpointing` are left out: neither changes an output.
    """
    digest = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("name", None)
    cfg.pop("grad_checkpointing", None)
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _source_string(source: str | os.PathLike) -> str:
    """A local checkpoint as its absolute path (so queries work from any directory), anything else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _load_model(source: str, overrides: dict[str, Any]) -> VideoCLIP:
    from stanvid.hub import load_model

    return load_model(source, **overrides)


# ---------------------------------------------------------------------------------------------- segments
def segment_bounds(duration: float, segment_seconds: float | None) -> list[tuple[float, float]]:
    """(start, end) seconds of each segment: consecutive spans of `segment_seconds`, the last one shorter.

    Without `segment_seconds` the whole video is one segment.
    """
    if duration <= 0:
        return []
    if segment_seconds is None:
        return [(0.0, float(duration))]
    count = max(1, math.ceil(duration / segment_seconds - 1e-9))
    return [(k * segment_seconds, min((k + 1) * segment_seconds, duration)) for k in range(count)]


def _segment_frames(
    start: float, end: float, fps: float, num_frames: int, clip_len: int
) -> np.ndarray | None:
    """Indices of `clip_len` frames sampled uniformly (test mode) among the frames shown in [start, end).

    Frame i is shown at i / fps. None when no frame falls in the span (a sliver at the end of a video).
    """
    first = max(0, math.ceil(start * fps - 1e-6))
    last = min(num_frames - 1, math.ceil(end * fps - 1e-6) - 1)
    if last < first:
        return None
    return first + uniform_indices(last - first + 1, clip_len)  # (clip_len,)


@dataclass
class _Chunk:
    """Up to `batch_size` decoded segments of one file, as produced by the loader (possibly in a worker)."""

    entry: _FileEntry
    meta: dict[str, Any] | None = None  # duration, fps, num_frames, width, height
    spans: list[tuple[float, float]] = field(default_factory=list)
    clips: torch.Tensor | None = None  # (n, T, 3, S, S) uint8
    last: bool = False
    error: str | None = None


class _ClipLoader(torch.utils.data.IterableDataset):
    """Decodes the files it is given into chunks of uniformly sampled, resized and centre-cropped clips.

    Normalization to float happens in the consumer, so workers pass uint8 (4x less shared memory).
    """

    def __init__(
        self,
        root: Path,
        entries: Sequence[_FileEntry],
        *,
        clip_len: int,
        image_size: int,
        segment_seconds: float | None,
        chunk: int,
        decoder_threads: int,
    ) -> None:
        self.root, self.entries = root, list(entries)
        self.clip_len, self.image_size = clip_len, image_size
        self.segment_seconds, self.chunk = segment_seconds, chunk
        self.decoder_threads = decoder_threads

    def __iter__(self) -> Iterator[_Chunk]:
        info = torch.utils.data.get_worker_info()
        entries = self.entries if info is None else self.entries[info.id :: info.num_workers]
        threads = self.decoder_threads if info is None else 1
        for entry in entries:
            yield from self._file_chunks(entry, threads)

    def _file_chunks(self, entry: _FileEntry, threads: int) -> Iterator[_Chunk]:
        from stanvid.video_io import probe, read_frames

        path = self.root / entry.relpath
        try:
            info = probe(path)
            meta = {
                "duration": info.duration,
                "fps": info.fps,
                "num_frames": info.num_frames,
                "width": info.width,
                "height": info.height,
            }
            spans, indices = [], []
            for start, end in segment_bounds(info.duration, self.segment_seconds):
                idx = _segment_frames(start, end, info.fps, info.num_frames, self.clip_len)
                if idx is not None:
                    spans.append((start, end))
                    indices.append(idx)
            if not spans:
                raise VideoReadError(f"{path}: no frames to sample (duration {info.duration:.3f} s)")
            for k in range(0, len(spans), self.chunk):
                part = np.concatenate(indices[k : k + self.chunk])  # (n * T,)
                frames = read_frames(path, part, size=self.image_size, threads=threads)  # (n*T, H, W, 3)
                frames = center_crop(
                    resize_short_side(frames, self.image_size), self.image_size
                )  # (n*T, 3, S, S)
                clips = frames.reshape(-1, self.clip_len, *frames.shape[1:]).contiguous()  # (n, T, 3, S, S)
                last = k + self.chunk >= len(spans)
                yield _Chunk(entry, meta, spans[k : k + self.chunk], clips, last)
        except VideoReadError as exc:
            message = str(exc)  # names the file already; the report lists the path once
            yield _Chunk(entry, error=message.removeprefix(f"{path}: "))


# ---------------------------------------------------------------------------------------------- SQLite
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    duration REAL NOT NULL,
    fps REAL NOT NULL,
    num_frames INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_file ON segments (file_id);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, error TEXT NOT NULL);
"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")  # readers (a running server) are not blocked by a build
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _get_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def _set_meta(conn: sqlite3.Connection, **values: Any) -> None:
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(k, json.dumps(v)) for k, v in values.items()],
    )


def _bump_generation(conn: sqlite3.Connection) -> None:
    gen = _get_meta(conn).get("generation", 0)
    _set_meta(conn, generation=gen + 1)


def _delete_file(conn: sqlite3.Connection, relpath: str) -> bool:
    row = conn.execute("SELECT id FROM files WHERE path = ?", (relpath,)).fetchone()
    if row is None:
        return False
    conn.execute("DELETE FROM segments WHERE file_id = ?", (row[0],))
    conn.execute("DELETE FROM files WHERE id = ?", (row[0],))
    return True


def _insert_file(
    conn: sqlite3.Connection,
    entry: _FileEntry,
    meta: dict[str, Any],
    segments: Sequence[tuple[float, float, bytes]],
) -> None:
    """Replace any row for this path by the new one and its segments (inside the caller's transaction)."""
    _delete_file(conn, entry.relpath)
    cur = conn.execute(
        "INSERT INTO files (path, size, mtime_ns, duration, fps, num_frames, width, height) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.relpath,
            entry.size,
            entry.mtime_ns,
            meta["duration"],
            meta["fps"],
            meta["num_frames"],
            meta["width"],
            meta["height"],
        ),
    )
    conn.executemany(
        "INSERT INTO segments (file_id, start, end, embedding) VALUES (?, ?, ?, ?)",
        [(cur.lastrowid, s, e, emb) for s, e, emb in segments],
    )


# ---------------------------------------------------------------------------------------------- FAISS
def make_vector_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    kind: str = "auto",
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
    nlist: int | None = None,
    nprobe: int | None = None,
) -> faiss.Index:
    """A FAISS inner-product index over `vectors` (N, D) float32 with int64 `ids` (N,).

    `kind`: "flat" (exact), "ivf" (inverted file: `nlist` k-means cells, `nprobe` of them searched), or "auto"
    (flat below `approx_threshold` vectors). Defaults: nlist = sqrt(N) (at most N / 39, FAISS's minimum of
    training points per cell), trained on a fixed random sample of at most 64 points per cell; nprobe = nlist / 16.
    At 1M vectors that trains in seconds where FAISS's usual 4 sqrt(N) cells take minutes on a small CPU, and
    probing 1/16 of the cells keeps recall@10 near 1 on clustered data (benchmarks/index.py).
    """
    if kind not in INDEX_KINDS:
        raise VideoIndexError(f"vector index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"vectors must be (N, D) with N ids, got {vectors.shape} and {ids.shape} ids")
    n, dim = vectors.shape
    if kind == "auto":
        kind = "ivf" if n >= approx_threshold else "flat"
    if kind == "flat" or n == 0:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        cells = nlist or max(1, min(int(math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 64 * cells), replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(cells, nprobe or max(1, cells // 16))
    if n:
        index.add_with_ids(vectors, ids)
    return index


def _describe(index: faiss.Index) -> str:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return f"approximate IVF, nlist={ivf.nlist}, nprobe={ivf.nprobe}"
    return "exact inner product"


def _vector_file(out: Path, generation: int) -> Path:
    return out / f"vectors-{generation}.faiss"


def _all_embeddings(conn: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute("SELECT id, embedding FROM segments ORDER BY id").fetchall()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for i, (_, blob) in enumerate(rows):
        vectors[i] = np.frombuffer(blob, dtype=np.float32)
    return ids, vectors


def _write_vector_index(out: Path, conn: sqlite3.Connection, **kind_args: Any) -> faiss.Index:
    """Build the FAISS index for the current rows and write it atomically; drop files of older generations."""
    meta = _get_meta(conn)
    generation = meta.get("generation", 0)
    ids, vectors = _all_embeddings(conn, meta["dim"])
    index = make_vector_index(vectors, ids, **kind_args)
    target = _vector_file(out, generation)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in out.glob("vectors-*.faiss"):
        if old != target:
            old.unlink(missing_ok=True)
    return index


# ---------------------------------------------------------------------------------------------- building
def _walk(root: Path, exclude: Path | None) -> list[_FileEntry]:
    """Video files under `root` (recursive, symlinked folders not followed), sorted by relative path."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if exclude is None or (here / d).resolve() != exclude)
        for name in filenames:
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            path = here / name
            try:
                st = path.stat()
            except OSError:
                continue  # vanished between listing and stat: not in the folder any more
            if path.is_file():
                entries.append(_FileEntry(path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(entries, key=lambda e: e.relpath)


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _default_device(world: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0)
    return torch.device("cpu")


class _Writer:
    """Accumulates decoded chunks, encodes them `per_forward` clips at a time and commits the files they finish
    in one transaction once `commit_every` clips are encoded (and at the end)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        runner: InferencePrecision,
        per_forward: int,
        commit_every: int,
        on_commit: Callable[[int], None] | None,
        progress_bar: Any,
    ) -> None:
        self.conn, self.runner = conn, runner
        self.per_forward, self.commit_every = per_forward, commit_every
        self.on_commit = on_commit
        self.failures: list[tuple[str, str]] = []  # (relpath, error)
        self.bar = progress_bar
        self.pending: dict[str, dict[str, Any]] = {}  # relpath -> entry, meta, spans, embeddings, complete
        self.buffer: list[tuple[str, torch.Tensor]] = []  # (relpath, (n, T, 3, S, S) uint8), oldest first
        self.buffered = 0
        self.uncommitted = 0  # clips encoded since the last commit
        self.committed = 0

    def add(self, chunk: _Chunk) -> None:
        key = chunk.entry.relpath
        if chunk.error is not None:
            self.pending.pop(key, None)
            self.buffer = [(k, c) for k, c in self.buffer if k != key]
            self.buffered = sum(len(c) for _, c in self.buffer)
            self.failures.append((key, chunk.error))
            self.bar.update(1)
            return
        state = self.pending.setdefault(
            key, {"entry": chunk.entry, "meta": chunk.meta, "spans": [], "emb": []}
        )
        state["spans"].extend(chunk.spans)
        state["complete"] = chunk.last
        self.buffer.append((key, chunk.clips))
        self.buffered += len(chunk.clips)
        if self.buffered >= self.per_forward:
            self._encode_buffer(everything=False)
        if self.uncommitted >= self.commit_every:
            self._commit()

    @torch.inference_mode()
    def _encode(self, clips: torch.Tensor) -> np.ndarray:
        """(n, T, 3, S, S) uint8 -> (n, D) float32 unit vectors, whatever the precision of the forward pass."""
        device = self.runner.device
        part = clips.to(device, non_blocking=True)
        b, t = part.shape[:2]
        video = normalize(part.flatten(0, 1)).view(b, t, *part.shape[2:])  # (n, T, 3, S, S) float
        with self.runner.autocast():
            emb = self.runner.model.encode_video(video)  # (n, D)
        return F.normalize(emb.float(), dim=-1).cpu().numpy()

    def _encode_buffer(self, everything: bool) -> None:
        """Encode the buffered clips in `per_forward` batches; a remainder smaller than a batch waits for more
        clips unless `everything`."""
        if not self.buffer:
            return
        keys = [k for k, c in self.buffer for _ in range(len(c))]
        clips = torch.cat([c for _, c in self.buffer])  # (n, T, 3, S, S)
        n = len(clips) if everything else len(clips) // self.per_forward * self.per_forward
        for k in range(0, n, self.per_forward):
            emb = self._encode(clips[k : min(n, k + self.per_forward)])
            for key, vec in zip(keys[k : k + len(emb)], emb, strict=True):
                self.pending[key]["emb"].append(vec)
        self.buffer = []  # the remainder, regrouped by file (clips of one file are contiguous)
        start = n
        for key, group in itertools.groupby(keys[n:]):
            count = len(list(group))
            self.buffer.append((key, clips[start : start + count]))
            start += count
        self.buffered = len(clips) - n
        self.uncommitted += n

    def _commit(self) -> None:
        self.uncommitted = 0
        done = [k for k, s in self.pending.items() if s.get("complete") and len(s["emb"]) == len(s["spans"])]
        if not done:
            return
        with _transaction(self.conn):
            for key in done:
                s = self.pending.pop(key)
                rows = [
                    (a, b, v.astype(np.float32).tobytes())
                    for (a, b), v in zip(s["spans"], s["emb"], strict=True)
                ]
                _insert_file(self.conn, s["entry"], s["meta"], rows)
            _bump_generation(self.conn)
        self.committed += len(done)
        self.bar.update(len(done))
        if self.on_commit is not None:
            self.on_commit(self.committed)

    def flush(self) -> None:
        self._encode_buffer(everything=True)
        self._commit()


def build_index(
    video_dir: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | VideoCLIP,
    *,
    model_source: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    segment_seconds: float | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    index_kind: str = "auto",
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: bool = True,
    on_commit: Callable[[int], None] | None = None,
    dist_timeout: timedelta = timedelta(hours=24),
) -> IndexReport:
    """Index the videos under `video_dir` into the directory `out` (created, or updated in place).

    `model` is any `stanvid.load_model` source (loaded with `model_overrides`) or a `VideoCLIP` already in
    memory (put in eval mode and moved to `device`; `model_source` names it for the record, and queries must
    pass the same model to `open_index`).
    Each video, or each `segment_seconds` span of it, is embedded from `model.config.num_frames` frames
    sampled uniformly within it. An existing index is updated: only new or changed files (size or mtime) are
    encoded, deleted ones are dropped. Finished files are committed every `batch_size` clips; `on_commit(n)` is
    called after each commit with the number of files committed so far. Unreadable videos are reported in
    `IndexReport.failed` and not indexed.

    `precision` (`stanvid.precision`: auto, fp32, bf16, fp16, int8) is the arithmetic of the forward passes;
    the stored embeddings are float32 unit vectors whatever it is, and the index records it. `num_workers`
    decoding processes run ahead of the model (None: the `stanvid.pipeline.thread_budget` choice; 0 decodes
    in this process, between forward passes).

    Under `torchrun` (RANK / WORLD_SIZE set), each rank encodes its share of the files to process into its own
    shard file; after a barrier (gloo), rank 0 merges the shards and writes the FAISS index.
    """
    t0 = time.perf_counter()
    if segment_seconds is not None and not segment_seconds > 0:
        raise VideoIndexError(f"segment_seconds must be positive, got {segment_seconds}")
    if batch_size < 1:
        raise VideoIndexError(f"batch_size must be >= 1, got {batch_size}")
    if index_kind not in INDEX_KINDS:
        raise VideoIndexError(f"index_kind must be one of {', '.join(INDEX_KINDS)}, got {index_kind!r}")
    root = Path(video_dir).expanduser().resolve()
    if not root.is_dir():
        raise VideoIndexError(f"{video_dir}: not a directory")
    out = Path(out).expanduser().resolve()
    overrides = dict(model_overrides or {})
    if isinstance(model, VideoCLIP):
        source = model_source or ""
        if overrides:
            raise VideoIndexError("model_overrides apply to a model source, not to a model already built")
    else:
        source = _source_string(model)
        model = _load_model(str(model), overrides)
    model = model.eval()
    fingerprint = model_fingerprint(model)
    rank, world = _dist_info()
    dev = torch.device(device) if device is not None else _default_device(world)
    resolve_precision(precision, dev)  # a bad precision fails before any process group exists
    group = _init_distributed(world, dist_timeout)
    model.to(dev)
    runner = prepare_for_inference(model, precision, dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    budget: ThreadBudget = thread_budget(dev, num_workers, local_world)

    report = IndexReport(index=str(out), precision=runner.precision)
    identity = {
        "format_version": FORMAT_VERSION,
        "root": str(root),
        "model_source": source,
        "model_overrides": overrides,
        "model_fingerprint": fingerprint,
        "model_config": model.config.to_dict(),
        "dim": model.config.clip.embed_dim,
        "segment_seconds": segment_seconds,
    }
    try:
        failure = None
        if rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                with contextlib.closing(_connect(out / DB_NAME)) as conn:
                    _prepare(conn, out, identity, report, root)
            except Exception as exc:  # shared with the other ranks below, then raised
                failure = exc
        _barrier(group, failure)
        main = _connect(out / DB_NAME)
        try:
            _check_identity(_get_meta(main), identity, out)
            disk = _walk(root, exclude=out)
            known = {r[0]: (r[1], r[2]) for r in main.execute("SELECT path, size, mtime_ns FROM files")}
            todo = [e for e in disk if known.get(e.relpath) != (e.size, e.mtime_ns)]
            report.files_seen = len(disk)
            report.unchanged = len(disk) - len(todo)
            mine = todo[rank::world]
            args = (root, mine, runner, batch_size, budget, segment_seconds, progress, on_commit)
            if world == 1:
                report.indexed, report.failed = _encode_files(main, *args)
            else:
                shard = out / SHARD_DIR / f"rank-{rank:05d}.sqlite"
                shard.parent.mkdir(exist_ok=True)
                with contextlib.closing(_connect(shard)) as conn:
                    with _transaction(conn):
                        _set_meta(conn, **identity)
                    report.indexed, report.failed = _encode_files(conn, *args)
                    with _transaction(conn):
                        conn.executemany(
                            "INSERT OR REPLACE INTO failures (path, error) VALUES (?, ?)", report.failed
                        )
        except Exception as exc:
            failure = exc
        finally:
            main.close()
        _barrier(group, failure)
        if rank == 0:
            with contextlib.closing(_connect(out / DB_NAME)) as conn:
                if world > 1:
                    report.indexed, report.failed = _merge_shards(conn, out)
                with _transaction(conn):
                    conn.execute("DELETE FROM failures")
                    conn.executemany(
                        "INSERT OR REPLACE INTO failures (path, error) VALUES (?, ?)", report.failed
                    )
                    dropped = [p for p, _ in report.failed if _delete_file(conn, p)]
                    if dropped:  # a changed file that is now unreadable: its old embedding is stale
                        _bump_generation(conn)
                    _record_precision(conn, runner.precision, encoded=report.indexed > 0)
                index = _write_vector_index(
                    out, conn, kind=index_kind, approx_threshold=approx_threshold, nlist=nlist, nprobe=nprobe
                )
                report.vector_index = _describe(index)
                report.built_precision = "+".join(_get_meta(conn).get("precisions", []))
                report.files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
                report.segments = conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
        report.failed = [(str(root / p), e) for p, e in report.failed]
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        if group is not None and group.get("owned"):
            import torch.distributed as dist

            dist.destroy_process_group()


def _record_precision(conn: sqlite3.Connection, precision: str, encoded: bool) -> None:
    """Keep the precisions the stored embeddings were computed in (`precisions`, in order of first use) and
    the latest one (`precision`); a run that encoded nothing changes neither, except on a new index."""
    meta = _get_meta(conn)
    used = list(meta.get("precisions", []))
    if encoded or not used:
        if precision not in used:
            used.append(precision)
        _set_meta(conn, precision=precision, precisions=used)


def _prepare(
    conn: sqlite3.Connection, out: Path, identity: dict[str, Any], report: IndexReport, root: Path
) -> None:
    """Rank 0, before any encoding: record or check the identity, merge shards an interrupted run left, and
    drop the files that are gone from the folder."""
    meta = _get_meta(conn)
    if not meta:
        with _transaction(conn):
            _set_meta(conn, **identity, generation=0)
        meta = _get_meta(conn)
    _check_identity(meta, identity, out)
    _merge_shards(conn, out)  # files an interrupted sharded run committed; its failures are retried below
    on_disk = {e.relpath for e in _walk(root, exclude=out)}
    gone = [r[0] for r in conn.execute("SELECT path FROM files") if r[0] not in on_disk]
    if gone:
        with _transaction(conn):
            for relpath in gone:
                _delete_file(conn, relpath)
            _bump_generation(conn)
    report.removed = len(gone)


def _check_identity(meta: dict[str, Any], identity: dict[str, Any], out: Path) -> None:
    """Refuse to mix embeddings of two models, two folders or two segmentations in one index."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise VideoIndexError(
            f"{out}: index format {meta.get('format_version')} is not {FORMAT_VERSION}; rebuild it"
        )
    if meta["model_fingerprint"] != identity["model_fingerprint"]:
        raise VideoIndexError(
            f"{out}: the index was built with another model ({meta['model_source'] or 'in-memory model'}, "
            f"fingerprint {meta['model_fingerprint'][:12]}), this one has fingerprint "
            f"{identity['model_fingerprint'][:12]}; use the same model or write a new index (another --out)"
        )
    for key, what in (("root", "folder"), ("segment_seconds", "segment length")):
        if meta[key] != identity[key]:
            raise VideoIndexError(
                f"{out}: the index was built with {what} {meta[key]!r}, not {identity[key]!r}; "
                f"use the same {what} or write a new index (another --out)"
            )


def _identity_collate(chunk: _Chunk) -> _Chunk:
    return chunk


def _encode_files(
    conn, root, entries, runner, batch_size, budget, segment_seconds, progress, on_commit
) -> tuple[int, list[tuple[str, str]]]:
    """Encode `entries` into `conn`; returns (files committed, [(relpath, error)] of unreadable ones).

    Decoding runs ahead in `budget.decode_workers` processes (`stanvid.pipeline`), the model encodes
    model-sized batches as soon as they are decoded, and finished files are committed every `batch_size` clips.
    """
    rank, world = _dist_info()
    cfg = runner.model.config
    loader_set = _ClipLoader(
        root,
        entries,
        clip_len=cfg.num_frames,
        image_size=cfg.clip.vision.image_size,
        segment_seconds=segment_seconds,
        chunk=batch_size,
        decoder_threads=0,
    )
    workers = min(budget.decode_workers, len(entries))
    loader = torch.utils.data.DataLoader(
        loader_set,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity_collate,
        prefetch_factor=PREFETCH_PER_WORKER if workers else None,
        worker_init_fn=budget.init_worker if workers else None,
    )
    rows = cfg.num_frames * (cfg.clip.vision.num_patches + 1)  # token rows one clip puts through a matmul
    per_forward = encode_batch_size(rows, runner.device, batch_size)
    desc = "indexing" if world == 1 else f"indexing (rank {rank})"
    with (
        tqdm(total=len(entries), desc=desc, unit="video", disable=not progress, position=rank) as bar,
        budget.model_threads_set(),
    ):
        writer = _Writer(conn, runner, per_forward, batch_size, on_commit, bar)
        for chunk in loader:
            writer.add(chunk)
        writer.flush()
    return writer.committed, writer.failures


def _merge_shards(conn: sqlite3.Connection, out: Path) -> tuple[int, list[tuple[str, str]]]:
    """Copy every shard's files and segments into the main index (by path, so merging twice is harmless),
    then delete the shard. Each shard is one transaction. Returns (files merged, failures the shards list)."""
    merged, failed = 0, []
    shard_dir = out / SHARD_DIR
    if not shard_dir.is_dir():
        return merged, failed
    main_meta = _get_meta(conn)
    for shard in sorted(shard_dir.glob("rank-*.sqlite")):
        with contextlib.closing(_connect(shard)) as src:
            meta = _get_meta(src)
            if meta and meta.get("model_fingerprint") != main_meta["model_fingerprint"]:
                raise VideoIndexError(f"{shard}: shard was written by another model; delete it and re-run")
            files = src.execute(
                "SELECT id, path, size, mtime_ns, duration, fps, num_frames, width, height FROM files"
            ).fetchall()
            failures = src.execute("SELECT path, error FROM failures").fetchall()
            with _transaction(conn):
                for fid, path, size, mtime_ns, *rest in files:
                    segs = src.execute(
                        "SELECT start, end, embedding FROM segments WHERE file_id = ? ORDER BY id", (fid,)
                    ).fetchall()
                    meta_row = dict(
                        zip(("duration", "fps", "num_frames", "width", "height"), rest, strict=True)
                    )
                    _insert_file(conn, _FileEntry(path, size, mtime_ns), meta_row, segs)
                if files:
                    _bump_generation(conn)
        merged += len(files)
        failed += failures
        for suffix in ("", "-wal", "-shm"):
            Path(f"{shard}{suffix}").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shard_dir.rmdir()
    return merged, sorted(failed)


def _init_distributed(world: int, timeout: timedelta) -> dict[str, Any] | None:
    """A gloo group for the barriers of a sharded run (CPU-only collectives, whatever the encoding device)."""
    if world <= 1:
        return None
    import torch.distributed as dist

    owned = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timeout)
        owned = True
    pg = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    return {"owned": owned, "group": pg}


def _barrier(group: dict[str, Any] | None, failure: Exception | None) -> None:
    """Wait for every rank, and share failures: when any rank failed, every rank raises (its own exception,
    or a `VideoIndexError` naming the rank that failed), so no rank waits forever for one that gave up."""
    if group is not None:
        import torch.distributed as dist

        messages: list[str | None] = [None] * dist.get_world_size()
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(messages, mine, group=group["group"])
        if failure is None:
            failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
            if failed:
                raise VideoIndexError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if failure is not None:
        raise failure


# ---------------------------------------------------------------------------------------------- querying
class VideoIndex:
    """An open index: text search, segment lookup and frames for thumbnails. Thread-safe (one lock).

    The query model is loaded on first use (`model`), from the recorded source unless one is passed, and its
    fingerprint must match the one recorded at build time. Queries are encoded at `precision`
    (`stanvid.precision`), which need not be the one the index was built with (`build_precision`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: VideoCLIP | None = None,
        device: str | None = None,
        precision: str = "auto",
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        db = self.path / DB_NAME
        if not db.is_file():
            raise VideoIndexError(
                f"{path}: no index here ({DB_NAME} missing); build one with `stanvid index`"
            )
        self._conn = _connect(db)
        self._lock = threading.RLock()
        self.meta = _get_meta(self._conn)
        if not self.meta:
            raise VideoIndexError(
                f"{path}: the index is empty (interrupted before its first commit); re-run the build"
            )
        self.root = Path(self.meta["root"])
        self.device = torch.device(device) if device else _default_device(1)
        self.precision = resolve_precision(precision, self.device)
        self._model = None
        self._runner: InferencePrecision | None = None
        if model is not None:
            self._model = self._verified(model)
        self.vectors = self._load_vectors()

    @property
    def build_precision(self) -> str:
        """The precision(s) the stored embeddings were computed in ("fp32", or "fp32+bf16" after mixed runs)."""
        return "+".join(self.meta.get("precisions", [])) or "fp32"  # indexes from before precisions were kept

    # -------------------------------------------------------------- model
    @property
    def model(self) -> VideoCLIP:
        with self._lock:
            if self._model is None:
                source = self.meta["model_source"]
                if not source:
                    raise VideoIndexError(
                        f"{self.path}: the index was built from an in-memory model; pass it: open_index(path, model=...)"
                    )
                self._model = self._verified(_load_model(source, self.meta["model_overrides"]))
            return self._model

    def _verified(self, model: VideoCLIP) -> VideoCLIP:
        found = model_fingerprint(model)
        if found != self.meta["model_fingerprint"]:
            raise VideoIndexError(
                f"{self.path}: the query model (fingerprint {found[:12]}) is not the model that built the index "
                f"({self.meta['model_source'] or 'in-memory model'}, fingerprint "
                f"{self.meta['model_fingerprint'][:12]}); its text embeddings would not match the video embeddings"
            )
        return model.eval().to(self.device)

    # -------------------------------------------------------------- vectors
    def _load_vectors(self) -> faiss.Index:
        generation = self.meta.get("generation", 0)
        file = _vector_file(self.path, generation)
        if file.is_file():
            return faiss.read_index(str(file))
        log.warning(
            "%s: vector file for generation %d is missing (interrupted build); rebuilding it in memory; "
            "re-run `stanvid index` to store it",
            self.path,
            generation,
        )
        ids, vectors = _all_embeddings(self._conn, self.meta["dim"])
        return make_vector_index(vectors, ids)

    def __len__(self) -> int:
        """Number of segments searched."""
        return int(self.vectors.ntotal)

    def num_files(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    # -------------------------------------------------------------- search
    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, D) float32, L2-normalized, with the index's model."""
        from stanvid.tokenizer import tokenize

        model = self.model
        with self._lock:
            if self._runner is None:
                self._runner = prepare_for_inference(model, self.precision, self.device)
            ids = tokenize(list(texts), context_length=model.config.clip.text.context_length).to(self.device)
            with self._runner.autocast():
                emb = self._runner.model.encode_text(ids)  # (N, D)
            emb = F.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()

    def search(self, text: str, k: int = 10) -> list[SearchResult]:
        """The `k` segments most similar to `text`, best first."""
        if not isinstance(text, str) or not text.strip():
            raise VideoIndexError("the query text is empty")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VideoIndexError(f"k must be a positive integer, got {k!r}")
        return self.search_embeddings(self.embed_text([text]), k)[0]

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[SearchResult]]:
        """Nearest segments for each (D,) row of `queries` (L2-normalized), best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta["dim"])
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self.vectors.search(queries, min(k, len(self)))  # (Q, k) each
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            found = {s.id: s for s in self.segments([int(i) for i in row_ids if i >= 0])}
            results.append(
                [
                    SearchResult(seg.id, seg.file_id, seg.path, seg.relpath, seg.start, seg.end, float(score))
                    for score, i in zip(row_scores, row_ids, strict=True)
                    if (seg := found.get(int(i))) is not None
                ]
            )
        return results

    # -------------------------------------------------------------- lookups
    def segments(self, ids: Sequence[int]) -> list[Segment]:
        """Segment rows by id (unknown ids are left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(
                "SELECT s.id, f.id, f.path, s.start, s.end, f.fps, f.num_frames, f.width, f.height, f.size, f.mtime_ns "
                f"FROM segments s JOIN files f ON f.id = s.file_id WHERE s.id IN ({marks})",
                [int(i) for i in ids],
            ).fetchall()
        return [Segment(sid, fid, str(self.root / rel), rel, *rest) for sid, fid, rel, *rest in rows]

    def segment(self, segment_id: int) -> Segment | None:
        found = self.segments([segment_id])
        return found[0] if found else None

    def file_path(self, file_id: int) -> Path | None:
        """Absolute path of an indexed file by id; None for an id the index does not have."""
        with self._lock:
            row = self._conn.execute("SELECT path FROM files WHERE id = ?", (int(file_id),)).fetchone()
        return None if row is None else self.root / row[0]

    def middle_frame(self, segment_id: int, size: int | None = None) -> torch.Tensor:
        """The frame shown at the middle of a segment, (H, W, 3) uint8, its shortest side shrunk to `size`
        when it is larger (never enlarged)."""
        from stanvid.video_io import read_frames

        seg = self.segment(segment_id)
        if seg is None:
            raise VideoIndexError(f"{self.path}: no segment with id {segment_id}")
        frame = min(seg.num_frames - 1, max(0, int((seg.start + seg.end) / 2 * seg.fps)))
        shrink = size if size is not None and size < min(seg.width, seg.height) else None
        return read_frames(seg.path, [frame], size=shrink)[0]

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(path, error) of the videos the last build could not read."""
        with self._lock:
            return [
                (str(self.root / p), e) for p, e in self._conn.execute("SELECT path, error FROM failures")
            ]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> VideoIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_index(
    path: str | os.PathLike,
    model: VideoCLIP | None = None,
    device: str | None = None,
    precision: str = "auto",
) -> VideoIndex:
    """Open an index built by `build_index` for searching (see `VideoIndex`)."""
    return VideoIndex(path, model=model, device=device, precision=precision)


def search_index(
    path: str | os.PathLike,
    text: str,
    k: int = 10,
    model: VideoCLIP | None = None,
    precision: str = "auto",
) -> list[SearchResult]:
    """One query against an index, with the model recorded in it (or `model`, which must be the same)."""
    with open_index(path, model=model, precision=precision) as index:
        return index.search(text, k)
