"""The index on disk: the SQLite database (schema, meta record, its validation and repair) and the FAISS
vector file beside it (written atomically, checked against the record before it is parsed).

SQLite is the source of truth; every commit that changes the segments bumps the `generation`, and the vector
file carries the generation in its name, so it is either the one for the current rows or absent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.fileio import atomic_write_bytes
from stanvid.search.index.records import _FileEntry

DB_NAME = "index.sqlite"

SHARD_DIR = "shards"

LOCK_NAME = ".lock"

FORMAT_VERSION = 1

DEFAULT_APPROX_THRESHOLD = 100_000

INDEX_KINDS = ("auto", "flat", "ivf")

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

    A segment may carry a fourth item, its per-frame vectors (Mug-STAN models: `stanvid.search.rerank`)."""
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
    atomic_write_bytes(target, data.tobytes())
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
