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

Hostile or damaged input never becomes a traceback or a silent wrong answer: a vector file that does not match
the SQLite side (its SHA-256, generation and count are recorded when it is written) or cannot be read is rebuilt
from SQLite; a damaged database names its file and what to do; `build_index` repairs what it can (rows whose
embeddings are damaged or orphaned are dropped and re-encoded) and holds a lock on the index folder, so two runs
never do the same work. A symbolic link is indexed only when it resolves inside the folder, and `open_video`
hands out a file only while it still is the one indexed (a regular file inside the folder, same size, mtime,
device and inode).

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
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stanvid.config import PreprocessConfig
from stanvid.errors import StanvidError, VideoReadError
from stanvid.locking import exclusive_lock
from stanvid.model import VideoCLIP
from stanvid.mug_search import blob_frames, frames_blob, keeps_frame_vectors, rerank
from stanvid.pipeline import PREFETCH_PER_WORKER, ThreadBudget, encode_batch_size, thread_budget
from stanvid.precision import InferencePrecision, prepare_for_inference, resolve_precision
from stanvid.sampling import uniform_indices
from stanvid.transforms import center_crop, normalize, resize_short_side

log = logging.getLogger("stanvid")

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoIndexError",
    "IndexReport",
    "IndexedFileError",
    "SearchResult",
    "Segment",
    "VideoIndex",
    "build_index",
    "encode_clips",
    "find_videos",
    "make_vector_index",
    "model_fingerprint",
    "open_index",
    "read_clip",
    "search_index",
    "segment_bounds",
    "segments_with_frames",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
DB_NAME = "index.sqlite"
SHARD_DIR = "shards"
LOCK_NAME = ".lock"
MIN_SEGMENT_SECONDS = 0.1  # below a few frames a "segment" repeats one frame num_frames times
MAX_SEGMENTS_PER_FILE = 100_000  # 28 h at 1 s; a file above it is listed as a failure, not indexed
FORMAT_VERSION = 1
DEFAULT_APPROX_THRESHOLD = 100_000
INDEX_KINDS = ("auto", "flat", "ivf")


class VideoIndexError(StanvidError):
    """The index is missing, damaged, was built differently (model, root, segments), or a query does not fit it."""


class IndexedFileError(VideoIndexError):
    """An indexed video is gone (`gone`) or is no longer the file that was indexed (replaced, turned into a
    directory, a symbolic link now pointing elsewhere). The message names the file relative to the folder."""

    def __init__(self, message: str, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone


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
        # a folder whose own name is not UTF-8 must not make printing the report fail
        return os.fsencode("\n".join(lines)).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class _FileEntry:
    relpath: str
    size: int
    mtime_ns: int
    device: int | None = None  # identity of the file (the link's target for a symbolic link)
    inode: int | None = None


# ---------------------------------------------------------------------------------------------- model identity
def model_fingerprint(model: VideoCLIP) -> str:
    """SHA-256 of the model's config and weights: two models with the same fingerprint embed identically.

    `name` and `grad_checkpointing` are left out: neither changes an output. The frame normalization is left out
    when it is OpenAI's (the only one before configs recorded it), so indexes built then still match.
    """
    digest = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("name", None)
    cfg.pop("grad_checkpointing", None)
    if model.config.clip.preprocess == PreprocessConfig():
        cfg["clip"].pop("preprocess")
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
def segment_bounds(
    duration: float, segment_seconds: float | None, *, limit: int = MAX_SEGMENTS_PER_FILE
) -> list[tuple[float, float]]:
    """(start, end) seconds of each segment: consecutive spans of `segment_seconds`, the last one shorter.

    Without `segment_seconds` the whole video is one segment. More than `limit` segments is refused
    (`VideoIndexError`) rather than built: a bogus duration must not turn into gigabytes of tuples.
    """
    if not duration > 0:  # also NaN
        return []
    if segment_seconds is None:
        return [(0.0, float(duration))]
    _check_segment_seconds(segment_seconds, minimum=0.0)
    count = _segment_count(duration, segment_seconds)
    if count > limit:
        raise VideoIndexError(
            f"{duration:g} s in segments of {segment_seconds:g} s is {count} segments; at most {limit} are allowed"
        )
    return [(k * segment_seconds, min((k + 1) * segment_seconds, duration)) for k in range(count)]


def _segment_count(duration: float, segment_seconds: float) -> int:
    ratio = duration / segment_seconds - 1e-9
    return max(1, math.ceil(ratio)) if math.isfinite(ratio) else 1 << 62


def _check_segment_seconds(segment_seconds: float, minimum: float) -> None:
    if isinstance(segment_seconds, bool) or not isinstance(segment_seconds, int | float):
        raise VideoIndexError(f"segment_seconds must be a number of seconds, got {segment_seconds!r}")
    if not (math.isfinite(segment_seconds) and segment_seconds > minimum):
        raise VideoIndexError(
            f"segment_seconds must be a finite number above {minimum:g}, got {segment_seconds}"
        )


def segments_with_frames(
    duration: float,
    fps: float,
    num_frames: int,
    segment_seconds: float | None,
    *,
    limit: int = MAX_SEGMENTS_PER_FILE,
) -> list[tuple[float, float]]:
    """The spans of `segment_bounds(duration, segment_seconds)` that show at least one frame (frame i is shown
    at i / fps), found from the frames rather than by listing every span.

    The work is bounded by what the file holds: a file whose one frame carries a timestamp of 10^10 frames
    has a duration of years but a single non-empty segment, found in microseconds. More than `limit`
    non-empty segments raises `VideoReadError` (the indexer lists the file as a failure with that reason).
    """
    if not duration > 0:
        return []
    if segment_seconds is None or num_frames <= 0 or not (fps > 0 and math.isfinite(fps)):
        return segment_bounds(duration, segment_seconds, limit=limit)
    _check_segment_seconds(segment_seconds, minimum=0.0)
    count = _segment_count(duration, segment_seconds)
    near = np.floor(
        np.arange(num_frames, dtype=np.float64) / (fps * segment_seconds)
    )  # (F,) segment of frame i
    ks = np.unique(np.concatenate([near - 1, near, near + 1]))
    ks = ks[(ks >= 0) & (ks < count)].astype(np.int64)  # (K,) candidates; the exact test below decides
    starts = ks * segment_seconds  # the same float operations as segment_bounds and _segment_frames
    ends = np.minimum((ks + 1) * segment_seconds, duration)
    tol = 1e-6 * np.minimum(1.0, (ends - starts) * fps)
    first = np.maximum(0, np.ceil(starts * fps - tol))
    last = np.minimum(num_frames - 1, np.ceil(ends * fps - tol) - 1)
    keep = last >= first
    if int(keep.sum()) > limit:
        raise VideoReadError(
            f"{int(keep.sum())} segments of {segment_seconds:g} s hold frames; at most {limit} per file are "
            f"indexed: use a longer --segment-seconds"
        )
    return [(float(a), float(b)) for a, b in zip(starts[keep], ends[keep], strict=True)]


def _segment_frames(
    start: float, end: float, fps: float, num_frames: int, clip_len: int
) -> np.ndarray | None:
    """Indices of `clip_len` frames sampled uniformly (test mode) among the frames shown in [start, end).

    Frame i is shown at i / fps. None when no frame falls in the span (a sliver at the end of a video).
    The rounding tolerance is 1e-6 frame, less for a span shorter than a frame (a file whose timestamps make
    its average rate a few frames per century must not lose its frames to the tolerance).
    """
    tol = 1e-6 * min(1.0, (end - start) * fps)
    first = max(0, math.ceil(start * fps - tol))
    last = min(num_frames - 1, math.ceil(end * fps - tol) - 1)
    if last < first:
        return None
    return first + uniform_indices(last - first + 1, clip_len)  # (clip_len,)


def read_clip(
    path: str | os.PathLike, start: float, end: float, *, clip_len: int, image_size: int
) -> torch.Tensor:
    """The clip the index would embed for the span [start, end) of a video: `clip_len` frames sampled as a
    segment is, resized and centre-cropped, `(clip_len, 3, S, S)` uint8. Query clips go through this so that
    an indexed span and the same span given as an example embed identically."""
    from stanvid.video_io import probe, read_frames

    info = probe(path)
    idx = _segment_frames(start, end, info.fps, info.num_frames, clip_len)
    if idx is None:
        raise VideoReadError(f"{path}: no frame is shown between {start:.3f} s and {end:.3f} s")
    frames = read_frames(path, idx, size=image_size)  # (T, H, W, 3)
    return center_crop(resize_short_side(frames, image_size), image_size).contiguous()  # (T, 3, S, S)


@torch.inference_mode()
def encode_clips(
    model: VideoCLIP,
    clips: torch.Tensor,
    device: torch.device,
    batch_size: int = 16,
    runner: InferencePrecision | None = None,
) -> np.ndarray:
    """`(n, T, 3, S, S)` uint8 clips -> `(n, D)` float32 L2-normalized video embeddings, as the index stores.

    `runner` (`stanvid.precision.prepare_for_inference(model, ...)`): the precision to encode in; float32 without.
    """
    out = []
    encoder = model if runner is None else runner.model
    precision = contextlib.nullcontext if runner is None else runner.autocast
    pre = model.config.clip.preprocess  # the normalization the CLIP was trained with
    for k in range(0, len(clips), batch_size):
        part = clips[k : k + batch_size].to(device)  # (b, T, 3, S, S) uint8
        b, t = part.shape[:2]
        video = normalize(part.flatten(0, 1), pre.mean, pre.std).view(
            b, t, *part.shape[2:]
        )  # (b, T, 3, S, S)
        with precision():
            emb = encoder.encode_video(video)  # (b, D)
        out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.clip.embed_dim), np.float32)


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
            for start, end in segments_with_frames(
                info.duration, info.fps, info.num_frames, self.segment_seconds
            ):
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
    height INTEGER NOT NULL,
    device INTEGER,
    inode INTEGER
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_file ON segments (file_id);
CREATE TABLE IF NOT EXISTS segment_frames (segment_id INTEGER PRIMARY KEY, frames BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, error TEXT NOT NULL);
"""


# table -> columns every index has; `device`/`inode` came later and are added to older files on opening
_TABLES = {
    "meta": {"key", "value"},
    "files": {"id", "path", "size", "mtime_ns", "duration", "fps", "num_frames", "width", "height"},
    "segments": {"id", "file_id", "start", "end", "embedding"},
    "failures": {"path", "error"},
}
# meta key -> accepted JSON types; `vectors` (the record of the vector file) is optional
_META_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "root": (str,),
    "model_source": (str,),
    "model_overrides": (dict,),
    "model_fingerprint": (str,),
    "model_config": (dict,),
    "dim": (int,),
    "segment_seconds": (int, float, type(None)),
    "generation": (int,),
}
_REPAIR = "re-run `stanvid index` (same folder, model and --out) to repair it"
_REBUILD = "move it away (or delete the index folder) and re-run `stanvid index` to build the index again"


@contextlib.contextmanager
def _db_errors(db: Path) -> Iterator[None]:
    """SQLite errors as one `VideoIndexError` naming the database file: a damaged or foreign file (truncated,
    garbage, not a database) or an operational failure (disk full, locked past the timeout)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise VideoIndexError(f"{db}: SQLite error: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise VideoIndexError(f"{db}: not a readable index database ({exc}); {_REBUILD}") from exc


def _connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """Open an index database. `create` makes the missing tables (building); without it (querying) a missing
    table is an error naming it, rather than an index that silently reads as empty."""
    with _db_errors(path):
        conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers (a running server) are not blocked by a build
            conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                conn.executescript(_SCHEMA)
            tables = {
                name: {row[1] for row in conn.execute(f"PRAGMA table_info({name})")} for name in _TABLES
            }
            for name, columns in _TABLES.items():
                if not tables[name]:
                    what = (
                        _REBUILD if name == "meta" else _REPAIR
                    )  # without the record nothing can be verified
                    raise VideoIndexError(f"{path}: the table {name!r} is missing; {what}")
                if missing := sorted(columns - tables[name]):
                    raise VideoIndexError(
                        f"{path}: the table {name!r} lacks the column(s) {', '.join(missing)}; {_REBUILD}"
                    )
            for column in ("device", "inode"):  # identity of each file, recorded since the server checks it
                if column not in tables["files"]:
                    conn.execute(f"ALTER TABLE files ADD COLUMN {column} INTEGER")
        except BaseException:
            conn.close()
            raise
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


def _get_meta(conn: sqlite3.Connection, where: Path | str = DB_NAME) -> dict[str, Any]:
    meta = {}
    for key, value in conn.execute("SELECT key, value FROM meta"):
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError) as exc:
            raise VideoIndexError(f"{where}: meta value of {key!r} is not valid JSON; {_REBUILD}") from exc
    return meta


def _check_meta(meta: dict[str, Any], where: Path | str) -> None:
    """Every recorded key present with the right type; a damaged record names its key."""
    for key, types in _META_TYPES.items():
        if key not in meta:
            raise VideoIndexError(f"{where}: the index record lacks {key!r}; {_REBUILD}")
        value = meta[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise VideoIndexError(
                f"{where}: the index record has a malformed {key!r} ({value!r:.60}); {_REBUILD}"
            )
    if meta["dim"] < 1:
        raise VideoIndexError(f"{where}: the index record has a malformed 'dim' ({meta['dim']}); {_REBUILD}")


def _set_meta(conn: sqlite3.Connection, **values: Any) -> None:
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(k, json.dumps(v)) for k, v in values.items()],
    )


def _bump_generation(conn: sqlite3.Connection) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    gen = json.loads(row[0]) if row is not None else 0
    _set_meta(conn, generation=(gen if isinstance(gen, int) else 0) + 1)


def _delete_file(conn: sqlite3.Connection, relpath: str) -> bool:
    row = conn.execute("SELECT id FROM files WHERE path = ?", (relpath,)).fetchone()
    if row is None:
        return False
    conn.execute(
        "DELETE FROM segment_frames WHERE segment_id IN (SELECT id FROM segments WHERE file_id = ?)",
        (row[0],),
    )
    conn.execute("DELETE FROM segments WHERE file_id = ?", (row[0],))
    conn.execute("DELETE FROM files WHERE id = ?", (row[0],))
    return True


def _insert_file(
    conn: sqlite3.Connection,
    entry: _FileEntry,
    meta: dict[str, Any],
    segments: Sequence[tuple[float, float, bytes] | tuple[float, float, bytes, bytes | None]],
) -> None:
    """Replace any row for this path by the new one and its segments (inside the caller's transaction).

    A segment may carry a fourth item, its per-frame vectors (Mug-STAN models: `stanvid.mug_search`)."""
    _delete_file(conn, entry.relpath)
    cur = conn.execute(
        "INSERT INTO files (path, size, mtime_ns, duration, fps, num_frames, width, height, device, inode) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.relpath,
            entry.size,
            entry.mtime_ns,
            meta["duration"],
            meta["fps"],
            meta["num_frames"],
            meta["width"],
            meta["height"],
            entry.device,
            entry.inode,
        ),
    )
    file_id = cur.lastrowid
    for start, end, emb, *frames in segments:
        seg = conn.execute(
            "INSERT INTO segments (file_id, start, end, embedding) VALUES (?, ?, ?, ?)",
            (file_id, start, end, emb),
        )
        if frames and frames[0] is not None:
            conn.execute(
                "INSERT INTO segment_frames (segment_id, frames) VALUES (?, ?)", (seg.lastrowid, frames[0])
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


def _all_embeddings(
    conn: sqlite3.Connection, dim: int, where: Path | str = DB_NAME
) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute(
        "SELECT s.id, s.embedding, f.path FROM segments s LEFT JOIN files f ON f.id = s.file_id ORDER BY s.id"
    ).fetchall()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.empty((len(rows), dim), dtype=np.float32)
    for i, (sid, blob, path) in enumerate(rows):
        if not isinstance(blob, bytes) or len(blob) != 4 * dim or path is None:
            what = f"of {path!r} has a damaged embedding" if path is not None else "belongs to no file"
            raise VideoIndexError(f"{where}: segment {sid} {what}; {_REPAIR} (it re-encodes that file)")
        vectors[i] = np.frombuffer(blob, dtype=np.float32)
    return ids, vectors


def _damaged_rows(conn: sqlite3.Connection, dim: int) -> tuple[list[str], int]:
    """Files whose rows cannot be used (an embedding of the wrong size or type, or no segment at all), and the
    number of segments that belong to no file (a dropped or damaged `files` table)."""
    bad = conn.execute(
        "SELECT path FROM files WHERE id IN (SELECT file_id FROM segments "
        "WHERE typeof(embedding) != 'blob' OR length(embedding) != ?) "
        "OR id NOT IN (SELECT file_id FROM segments)",
        (4 * dim,),
    ).fetchall()
    orphans = conn.execute(
        "SELECT COUNT(*) FROM segments WHERE file_id NOT IN (SELECT id FROM files)"
    ).fetchone()[0]
    return [r[0] for r in bad], orphans


def _write_vector_index(out: Path, conn: sqlite3.Connection, **kind_args: Any) -> faiss.Index:
    """Build the FAISS index for the current rows and write it atomically; drop files of older generations.

    Its SHA-256, generation and vector count are recorded in the meta table, so a reader can tell this file
    from a damaged one or one copied from another index.
    """
    meta = _get_meta(conn)
    generation = meta.get("generation", 0)
    ids, vectors = _all_embeddings(conn, meta["dim"], out / DB_NAME)
    index = make_vector_index(vectors, ids, **kind_args)
    data = faiss.serialize_index(index)  # (bytes,) uint8
    target = _vector_file(out, generation)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {
        "generation": generation,
        "count": int(index.ntotal),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    with _transaction(conn):
        _set_meta(conn, vectors=record)
    for old in out.glob("vectors-*.faiss"):
        if old != target:
            old.unlink(missing_ok=True)
    return index


def _read_vector_index(
    file: Path, record: Any, generation: int, count: int, dim: int
) -> tuple[faiss.Index | None, str]:
    """The vector file if it is the one recorded for this generation of rows, else (None, what is wrong).

    The bytes are checked before FAISS parses them, so a foreign or damaged file is never deserialized.
    """
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return None, "is missing (interrupted build)"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    if isinstance(record, dict):
        if record.get("generation") != generation or record.get("sha256") != hashlib.sha256(data).hexdigest():
            return None, "does not match the index database (damaged, or copied from another index)"
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError:
        return None, "is not a readable FAISS index (damaged)"
    if index.ntotal != count or index.d != dim:
        return None, (
            f"holds {index.ntotal} vectors of dimension {index.d}, the database {count} of dimension {dim} "
            f"(copied from another index?)"
        )
    return index, ""


# ---------------------------------------------------------------------------------------------- building
def _walk(root: Path, exclude: Path | None, skipped: list[tuple[str, str]] | None = None) -> list[_FileEntry]:
    """Video files under `root` (recursive, symlinked folders not followed), sorted by relative path.

    Symbolic link policy: a link to a file is indexed only when it resolves inside `root` (a link out of the
    folder would let the index, and the server, read files that are not the folder's). A name that is not
    valid UTF-8 cannot be stored (SQLite text, JSON) and is skipped. Both are appended to `skipped` as
    (relative path, reason), the name written with backslash escapes for its undecodable bytes.
    """
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if exclude is None or (here / d).resolve() != exclude)
        for name in filenames:
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            path = here / name
            relpath = path.relative_to(root).as_posix()
            if not _is_utf8(relpath):
                if skipped is not None:
                    skipped.append(
                        (_printable(relpath), "the file name is not valid UTF-8 (rename it to index it)")
                    )
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # vanished between listing and stat (or a dangling link): not in the folder
            if path.is_symlink() and not _inside(Path(os.path.realpath(path)), root):
                if skipped is not None:
                    skipped.append(
                        (relpath, "a symbolic link to a file outside the indexed folder (not followed)")
                    )
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append(_FileEntry(relpath, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
    return sorted(entries, key=lambda e: e.relpath)


def find_videos(root: str | os.PathLike) -> list[Path]:
    """The video files an index of `root` would hold (same extensions and walk), sorted by relative path."""
    root = Path(root)
    return [root / e.relpath for e in _walk(root, exclude=None)]


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk decodes undecodable bytes to lone surrogates
        return False
    return True


def _printable(name: str) -> str:
    """A file name with undecodable bytes written as \\xNN, for messages and the failure list."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


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
            key, {"entry": chunk.entry, "meta": chunk.meta, "spans": [], "emb": [], "frames": []}
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
    def _encode(self, clips: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, T, 3, S, S) uint8 -> (n, D) float32 unit vectors whatever the precision of the forward pass, and
        (n, T, D) float32 per-frame vectors for a Mug-STAN model (else None)."""
        model = self.runner.model
        part = clips.to(self.runner.device, non_blocking=True)
        b, t = part.shape[:2]
        pre = model.config.clip.preprocess  # the normalization the CLIP was trained with
        video = normalize(part.flatten(0, 1), pre.mean, pre.std).view(
            b, t, *part.shape[2:]
        )  # (n, T, 3, S, S)
        with self.runner.autocast():
            if keeps_frame_vectors(model):
                per_frame = model.encode_video(video, pool=False)  # (n, T, D)
                emb = model.pool(per_frame)  # (n, D)
            else:
                per_frame, emb = None, model.encode_video(video)  # (n, D)
        frames = None if per_frame is None else per_frame.float().cpu().numpy()
        return F.normalize(emb.float(), dim=-1).cpu().numpy(), frames

    def _encode_buffer(self, everything: bool) -> None:
        """Encode the buffered clips in `per_forward` batches; a remainder smaller than a batch waits for more
        clips unless `everything`."""
        if not self.buffer:
            return
        keys = [k for k, c in self.buffer for _ in range(len(c))]
        clips = torch.cat([c for _, c in self.buffer])  # (n, T, 3, S, S)
        n = len(clips) if everything else len(clips) // self.per_forward * self.per_forward
        for k in range(0, n, self.per_forward):
            emb, frames = self._encode(clips[k : min(n, k + self.per_forward)])
            for i, (key, vec) in enumerate(zip(keys[k : k + len(emb)], emb, strict=True)):
                self.pending[key]["emb"].append(vec)
                self.pending[key]["frames"].append(None if frames is None else frames_blob(frames[i]))
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
                    (a, b, v.astype(np.float32).tobytes(), f)
                    for (a, b), v, f in zip(s["spans"], s["emb"], s["frames"], strict=True)
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

    Rank 0 holds a lock on `out` for the whole run (`stanvid.locking`): a second run on the same index raises
    `LockHeldError` naming the process that holds it. Symbolic links resolving outside `video_dir` and names
    that are not valid UTF-8 are not indexed and are listed in `IndexReport.failed` with the reason.
    """
    t0 = time.perf_counter()
    if segment_seconds is not None:
        _check_segment_seconds(segment_seconds, minimum=0.0)
        if segment_seconds < MIN_SEGMENT_SECONDS:
            raise VideoIndexError(
                f"segment_seconds must be at least {MIN_SEGMENT_SECONDS} s, got {segment_seconds:g}"
            )
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers (--workers)", 0 if num_workers is None else num_workers, 0),
        ("approx_threshold", approx_threshold, 1),
        ("nlist", 1 if nlist is None else nlist, 1),
        ("nprobe", 1 if nprobe is None else nprobe, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise VideoIndexError(f"{name} must be an integer >= {low}, got {value!r}")
    if index_kind not in INDEX_KINDS:
        raise VideoIndexError(f"index_kind must be one of {', '.join(INDEX_KINDS)}, got {index_kind!r}")
    root = Path(video_dir).expanduser().resolve()
    if not root.is_dir():
        raise VideoIndexError(f"{video_dir}: not a directory")
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise VideoIndexError(f"{out}: exists and is not a directory; --out names the index folder")
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
    db = out / DB_NAME
    lock = contextlib.ExitStack()
    try:
        failure = None
        if rank == 0:
            try:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise VideoIndexError(f"{out}: cannot create the index folder ({exc.strerror})") from exc
                lock.enter_context(exclusive_lock(out / LOCK_NAME, f"the index {out}"))
                with contextlib.closing(_connect(db)) as conn, _db_errors(db):
                    _prepare(conn, out, identity, report, root)
            except Exception as exc:  # shared with the other ranks below, then raised
                failure = exc
        _barrier(group, failure)
        main = _connect(db)
        skipped: list[tuple[str, str]] = []
        try:
            with _db_errors(db):
                meta = _get_meta(main, db)
                _check_meta(meta, db)
                _check_identity(meta, identity, out)
                disk = _walk(root, exclude=out, skipped=skipped)
                known = {
                    r[0]: r[1:] for r in main.execute("SELECT path, size, mtime_ns, device, inode FROM files")
                }
            todo = [e for e in disk if _changed(e, known.get(e.relpath))]
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
        except sqlite3.DatabaseError as exc:  # a commit in the encode loop (disk full, ...)
            failure = VideoIndexError(f"{db}: SQLite error: {exc}")
            failure.__cause__ = exc
        except Exception as exc:
            failure = exc
        finally:
            main.close()
        _barrier(group, failure)
        if rank == 0:
            with contextlib.closing(_connect(db)) as conn, _db_errors(db):
                if world > 1:
                    report.indexed, report.failed = _merge_shards(conn, out)
                report.failed = sorted(report.failed + skipped)
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
        lock.close()
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
    """Rank 0, before any encoding: record or check the identity, merge shards an interrupted run left, repair
    what a damaged database lets us (rows without a usable embedding are dropped, so their files are encoded
    again), record the identity of files indexed before it was kept, and drop the files gone from the folder."""
    db = out / DB_NAME
    meta = _get_meta(conn, db)
    if not meta:
        if conn.execute("SELECT EXISTS (SELECT 1 FROM segments) OR EXISTS (SELECT 1 FROM files)").fetchone()[
            0
        ]:
            raise VideoIndexError(
                f"{db}: the index record (meta table) is gone but embeddings remain, of unknown origin; {_REBUILD}"
            )
        with _transaction(conn):
            _set_meta(conn, **identity, generation=0)
        meta = _get_meta(conn, db)
    _check_meta(meta, db)
    _check_identity(meta, identity, out)
    _merge_shards(conn, out)  # files an interrupted sharded run committed; its failures are retried below
    damaged, orphans = _damaged_rows(conn, meta["dim"])
    if damaged or orphans:
        log.warning(
            "%s: %d file(s) with damaged rows and %d segment(s) of no file: dropped, their videos are encoded "
            "again",
            db,
            len(damaged),
            orphans,
        )
        with _transaction(conn):
            for relpath in damaged:
                _delete_file(conn, relpath)
            conn.execute("DELETE FROM segments WHERE file_id NOT IN (SELECT id FROM files)")
            _bump_generation(conn)
    disk = {e.relpath: e for e in _walk(root, exclude=out)}
    rows = conn.execute("SELECT path, size, mtime_ns, inode FROM files").fetchall()
    gone = [r[0] for r in rows if r[0] not in disk]
    legacy = [  # indexed before file identities were recorded, unchanged since: record it, no re-encoding
        disk[p]
        for p, size, mtime_ns, inode in rows
        if inode is None and p in disk and (size, mtime_ns) == (disk[p].size, disk[p].mtime_ns)
    ]
    if gone or legacy:
        with _transaction(conn):
            for relpath in gone:
                _delete_file(conn, relpath)
            conn.executemany(
                "UPDATE files SET device = ?, inode = ? WHERE path = ?",
                [(e.device, e.inode, e.relpath) for e in legacy],
            )
            if gone:
                _bump_generation(conn)
    report.removed = len(gone)


def _changed(entry: _FileEntry, row: tuple | None) -> bool:
    """A file to (re-)encode: new, or its size, mtime or identity differ from the indexed row's."""
    if row is None:
        return True
    size, mtime_ns, device, inode = row
    if (size, mtime_ns) != (entry.size, entry.mtime_ns):
        return True
    return inode is not None and (device, inode) != (entry.device, entry.inode)


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
                "SELECT id, path, size, mtime_ns, device, inode, duration, fps, num_frames, width, height "
                "FROM files"
            ).fetchall()
            failures = src.execute("SELECT path, error FROM failures").fetchall()
            with _transaction(conn):
                for fid, path, size, mtime_ns, device, inode, *rest in files:
                    segs = src.execute(
                        "SELECT s.start, s.end, s.embedding, f.frames FROM segments s "
                        "LEFT JOIN segment_frames f ON f.segment_id = s.id WHERE s.file_id = ? ORDER BY s.id",
                        (fid,),
                    ).fetchall()
                    meta_row = dict(
                        zip(("duration", "fps", "num_frames", "width", "height"), rest, strict=True)
                    )
                    _insert_file(conn, _FileEntry(path, size, mtime_ns, device, inode), meta_row, segs)
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
        self.db = db = self.path / DB_NAME
        if not db.is_file():
            raise VideoIndexError(
                f"{path}: no index here ({DB_NAME} missing); build one with `stanvid index`"
            )
        self._conn = _connect(db, create=False)
        self._lock = threading.RLock()
        try:
            with _db_errors(db):
                self.meta = _get_meta(self._conn, db)
                if not self.meta:
                    raise VideoIndexError(
                        f"{path}: the index is empty (interrupted before its first commit); re-run the build"
                    )
                _check_meta(self.meta, db)
                self.root = Path(self.meta["root"])
                self.device = torch.device(device) if device else _default_device(1)
                self.precision = resolve_precision(precision, self.device)
                self._model = None
                self._runner: InferencePrecision | None = None
                if model is not None:
                    self._model = self._verified(model)
                self.vectors = self._load_vectors()
        except BaseException:
            self._conn.close()
            raise

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
        """The stored vector file when it is the one recorded for the current rows; otherwise (missing,
        unreadable, damaged, another index's) the vectors are rebuilt in memory from SQLite, with a warning."""
        generation, dim = self.meta["generation"], self.meta["dim"]
        file = _vector_file(self.path, generation)
        count = self._conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
        index, problem = _read_vector_index(file, self.meta.get("vectors"), generation, count, dim)
        if index is not None:
            return index
        log.warning(
            "%s %s; rebuilding it in memory from %s; re-run `stanvid index` to store it",
            file,
            problem,
            DB_NAME,
        )
        ids, vectors = _all_embeddings(self._conn, dim, self.db)
        return make_vector_index(vectors, ids)

    def __len__(self) -> int:
        """Number of segments searched."""
        return int(self.vectors.ntotal)

    def num_files(self) -> int:
        with self._lock, _db_errors(self.db):
            return self._conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    @property
    def model_name(self) -> str:
        """The model by its name, not where it lies on this machine: a local checkpoint's folder or file name,
        a hub id or OpenAI name as given; "" for an in-memory model."""
        source = self.meta["model_source"]
        return Path(source).name if source and Path(source).is_absolute() else source

    # -------------------------------------------------------------- search
    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, D) float32, L2-normalized, with the index's model."""
        from stanvid.tokenizer import tokenize

        model = self.model
        with self._lock:
            runner = self._inference()
            ids = tokenize(list(texts), context_length=model.config.clip.text.context_length).to(self.device)
            with runner.autocast():
                emb = runner.model.encode_text(ids)  # (N, D)
            emb = F.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()

    def _inference(self) -> InferencePrecision:
        """The query model prepared for the index's query precision (made once; call under `self._lock`)."""
        if self._runner is None:
            self._runner = prepare_for_inference(self.model, self.precision, self.device)
        return self._runner

    @torch.inference_mode()
    def embed_text_tokens(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) strings -> per-token features (N, L, D) float32 and their mask (N, L), L = max(length, longest
        caption), on the CPU, with the index's model (for the Mug head's re-ranking)."""
        from stanvid.tokenizer import tokenize

        model = self.model
        with self._lock:
            ids = tokenize(list(texts), context_length=model.config.clip.text.context_length)
            used = int((ids != 0).sum(dim=1).max())
            ids = ids[:, : max(min(length, ids.shape[1]), used)].to(self.device)
            tokens = model.encode_text(ids, pool=False).float()  # (N, L, D)
        return tokens.cpu(), (ids != 0).cpu()

    def segment_frames(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Per-frame vectors (T, D) float32 of segments by id, for indexes built by a Mug-STAN model."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT segment_id, frames FROM segment_frames WHERE segment_id IN ({marks})",
                [int(i) for i in ids],
            ).fetchall()
        return {
            sid: blob_frames(blob, self.meta["dim"], where=f"{self.path}: segment {sid}")
            for sid, blob in rows
        }

    def search(self, text: str, k: int = 10) -> list[SearchResult]:
        """The `k` segments most similar to `text`, best first.

        With a Mug-STAN model (`similarity: mug`), FAISS's nearest candidates by pooled cosine are re-ranked by
        the Mug head on their per-frame vectors (`stanvid.mug_search.rerank`); scores are then the head's."""
        if not isinstance(text, str) or not text.strip():
            raise VideoIndexError("the query text is empty")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VideoIndexError(f"k must be a positive integer, got {k!r}")
        if keeps_frame_vectors(self.model):
            return rerank(self, text, k)
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

    def embed_clips(self, clips: torch.Tensor) -> np.ndarray:
        """`(n, T, 3, S, S)` uint8 clips (see `read_clip`) -> `(n, D)` L2-normalized, with the index's model."""
        model = self.model
        with self._lock:
            return encode_clips(model, clips, self.device, runner=self._inference())

    def search_image(self, image: Any, k: int = 10, **query: Any) -> list[SearchResult]:
        """Segments most similar to an image (path, bytes, PIL image or (H, W, 3) uint8 array); `query` takes
        the other fields of `stanvid.query.Query` (text, weights). See `stanvid.query`."""
        from stanvid.query import Query, search

        return search(self, Query(image=image, **query), k)

    def search_video(self, like: Any, k: int = 10, **query: Any) -> list[SearchResult]:
        """Segments most similar to an example clip: `"file.mp4"`, `"file.mp4:START-END"` (seconds), a segment
        id (int) or a `stanvid.query.ClipSpec`; `query` as in `search_image`."""
        from stanvid.query import Query, search

        return search(self, Query(like=like, **query), k)

    # -------------------------------------------------------------- lookups
    def segment_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """`(len(ids), D)` stored embeddings, in the order of `ids`; an unknown id raises `VideoIndexError`."""
        dim = self.meta["dim"]
        if not ids:
            return np.zeros((0, dim), np.float32)
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = dict(
                self._conn.execute(
                    f"SELECT id, embedding FROM segments WHERE id IN ({marks})", [int(i) for i in ids]
                ).fetchall()
            )
        missing = [int(i) for i in ids if int(i) not in rows]
        if missing:
            raise VideoIndexError(f"{self.path}: no segment with id {missing[0]}")
        return np.stack([np.frombuffer(rows[int(i)], dtype=np.float32) for i in ids])

    def all_segments(self) -> tuple[list[Segment], np.ndarray]:
        """Every segment, ordered by file path and start time, with its `(N, D)` stored embedding."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT s.id, f.id, f.path, s.start, s.end, f.fps, f.num_frames, f.width, f.height, f.size, "
                "f.mtime_ns, s.embedding FROM segments s JOIN files f ON f.id = s.file_id ORDER BY f.path, s.start"
            ).fetchall()
        vectors = np.empty((len(rows), self.meta["dim"]), np.float32)  # (N, D)
        for i, row in enumerate(rows):
            vectors[i] = np.frombuffer(row[-1], dtype=np.float32)
        segs = [Segment(sid, fid, str(self.root / rel), rel, *rest[:-1]) for sid, fid, rel, *rest in rows]
        return segs, vectors

    def file_segments(self, file_id: int) -> tuple[list[Segment], np.ndarray]:
        """All segments of one file in time order, with their `(n, D)` stored embeddings."""
        with self._lock:
            ids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT id FROM segments WHERE file_id = ? ORDER BY start", (int(file_id),)
                )
            ]
        segs = {s.id: s for s in self.segments(ids)}
        return [segs[i] for i in ids], self.segment_embeddings(ids)

    def segments(self, ids: Sequence[int]) -> list[Segment]:
        """Segment rows by id (unknown ids are left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock, _db_errors(self.db):
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
        with self._lock, _db_errors(self.db):
            row = self._conn.execute("SELECT path FROM files WHERE id = ?", (int(file_id),)).fetchone()
        return None if row is None else self.root / row[0]

    def file_relpath(self, file_id: int) -> str | None:
        """Path of an indexed file relative to the indexed folder; None for an unknown id."""
        path = self.file_path(file_id)
        return None if path is None else path.relative_to(self.root).as_posix()

    def open_video(self, file_id: int) -> tuple[BinaryIO, os.stat_result, str] | None:
        """The indexed file `file_id` opened for reading, with its `fstat` and its path relative to the folder,
        if it still is the file indexed; None for an id the index does not have.

        Raises `IndexedFileError` (message relative to the folder) when it is gone, or when it is no longer
        what was indexed: its real path (symbolic links resolved at this moment) leaves the folder, it is not
        a regular file, or its size, mtime, device or inode differ. The checks are made on the opened
        descriptor, so the bytes read from it are those of the checked file whatever is renamed afterwards.
        """
        with self._lock, _db_errors(self.db):
            row = self._conn.execute(
                "SELECT path, size, mtime_ns, device, inode FROM files WHERE id = ?", (int(file_id),)
            ).fetchone()
        if row is None:
            return None
        relpath, size, mtime_ns, device, inode = row
        name = f"file {file_id} ({relpath})"
        changed = f"{name} is no longer the file that was indexed"
        real = Path(os.path.realpath(self.root / relpath))
        if not _inside(real, self.root):
            raise IndexedFileError(f"{changed}: it now resolves outside the indexed folder", gone=False)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no FIFO waits
        try:
            fd = os.open(real, flags)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise IndexedFileError(f"{name} is gone from the server", gone=True) from exc
        except OSError as exc:
            raise IndexedFileError(f"{changed} ({exc.strerror})", gone=False) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise IndexedFileError(f"{changed}: it is now {kind}", gone=False)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) or (
                inode is not None and (st.st_dev, st.st_ino) != (device, inode)
            ):
                raise IndexedFileError(
                    f"{changed}: it was modified or replaced; re-run `stanvid index`", gone=False
                )
            return os.fdopen(fd, "rb"), st, relpath
        except BaseException:
            os.close(fd)
            raise

    def middle_frame(self, segment_id: int, size: int | None = None) -> torch.Tensor:
        """The frame shown at the middle of a segment, (H, W, 3) uint8, its shortest side shrunk to `size`
        when it is larger (never enlarged)."""
        from stanvid.video_io import read_frames

        seg = self.segment(segment_id)
        if seg is None:
            raise VideoIndexError(f"{self.path}: no segment with id {segment_id}")
        frame = min(seg.num_frames - 1, max(0, int((seg.start + seg.end) / 2 * seg.fps)))
        shrink = size if size is not None and size < min(seg.width, seg.height) else None
        self._check_file(seg.file_id)  # still the indexed file, before and after decoding (see open_video)
        image = read_frames(os.path.realpath(seg.path), [frame], size=shrink)[0]
        self._check_file(seg.file_id)
        return image

    def _check_file(self, file_id: int) -> None:
        opened = self.open_video(file_id)
        if opened is None:
            raise VideoIndexError(f"{self.path}: no file with id {file_id}")
        opened[0].close()

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(path, error) of the videos the last build could not read."""
        with self._lock, _db_errors(self.db):
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
