"""The index on disk: the SQLite database (schema, meta record, its validation and repair) beside the
embedding store its rows point into (`stanvid.search.index.vectors`) and the vector index files
(`stanvid.search.index.ann`).

SQLite is the record of truth: files, segments (each with the `slot` of its vector in the store), the dead
slots of deleted segments, the hashes of the store's appended chunks and the meta record. Every commit that
changes the segments bumps the `generation`; the vectors a commit points at are durable before it commits."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.locking import processes_using
from stanvid.search.index import moment_store
from stanvid.search.index.records import _FileEntry
from stanvid.search.index.vectors import VectorStore

log = logging.getLogger("stanvid")

DB_NAME = "index.sqlite"

SHARD_DIR = "shards"

LOCK_NAME = ".lock"

FORMAT_VERSION = 2  # 2: embeddings in the store file (1 kept them as SQLite blobs)

_SCHEMA = (
    """
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
    slot INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_file ON segments (file_id);
CREATE INDEX IF NOT EXISTS segments_slot ON segments (slot);
CREATE TABLE IF NOT EXISTS segment_frames (segment_id INTEGER PRIMARY KEY, frames BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, error TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dead (seq INTEGER PRIMARY KEY AUTOINCREMENT, slot INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS store_chunks (first INTEGER PRIMARY KEY, rows INTEGER NOT NULL, sha256 TEXT NOT NULL);
"""
    + moment_store.SCHEMA
)


# table -> columns every index has; `device`/`inode` came later and are added to older files on opening

_TABLES = {
    "meta": {"key", "value"},
    "files": {"id", "path", "size", "mtime_ns", "duration", "fps", "num_frames", "width", "height"},
    "segments": {"id", "file_id", "start", "end", "slot"},
    "failures": {"path", "error"},
    "dead": {"seq", "slot"},
    "store_chunks": {"first", "rows", "sha256"},
}

# meta key -> accepted JSON types; `ann` (the record of the vector index files) is optional

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
    "store": (dict,),
}

# container metadata of each file (`stanvid.video.tags`); `tags` is 1 where they were read (NULL in files
# indexed before they were recorded, or imported from embeddings: their creation time and title are unknown)
FILE_TAG_COLUMNS = (("created", "REAL"), ("title", "TEXT"), ("tags", "INTEGER"))

_REPAIR = "re-run `stanvid index` (same folder, model and --out) to repair it"

_REBUILD = "move it away (or delete the index folder) and re-run `stanvid index` to build the index again"


@contextlib.contextmanager
def _db_errors(db: Path) -> Iterator[None]:
    """SQLite errors as one `VideoIndexError` naming the database file: a damaged or foreign file (truncated,
    garbage, not a database) or an operational failure (disk full, locked past the timeout)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise VideoIndexError(_locked_message(db)) from exc
        raise VideoIndexError(f"{db}: SQLite error: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise VideoIndexError(f"{db}: not a readable index database ({exc}); {_REBUILD}") from exc


_WARNED_JOURNAL: set[Path] = set()
BUSY_SECONDS = 60.0  # how long a connection waits for another one's lock before "database is locked"


def _locked_message(db: Path) -> str:
    """Who holds a locked index database, and what to do."""
    holders = processes_using(db)
    who = f" (open in process {', '.join(holders)})" if holders else ""
    return (
        f"{db}: the database stayed locked by another process for {BUSY_SECONDS:g} s{who}; a server only "
        "reads it, so this is a process writing it or stuck in a transaction: let it finish or stop it, then "
        "re-run (a `stanvid serve` that does not exit can be restarted after the run)"
    )


def _connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """Open an index database. `create` makes the missing tables (building); without it (querying) a missing
    table is an error naming it, rather than an index that silently reads as empty, and a missing file is
    an error rather than an empty database made in its place."""
    with _db_errors(path):
        target = str(path) if create else Path(path).resolve().as_uri() + "?mode=rw"
        conn = sqlite3.connect(
            target, timeout=BUSY_SECONDS, check_same_thread=False, isolation_level=None, uri=not create
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]  # readers do not block a build
            if str(mode).lower() != "wal" and path not in _WARNED_JOURNAL:
                _WARNED_JOURNAL.add(path)
                log.warning("%s: SQLite cannot use write-ahead logging here (journal mode %s): a server reading "
                            "it blocks `stanvid index` while it answers", path, mode)  # fmt: skip
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
                    if name == "segments" and "embedding" in tables[name]:
                        raise VideoIndexError(
                            f"{path}: an index of format 1 (embeddings inside SQLite), which this version does "
                            f"not read; {_REBUILD}"
                        )
                    raise VideoIndexError(
                        f"{path}: the table {name!r} lacks the column(s) {', '.join(missing)}; {_REBUILD}"
                    )
            for column in ("device", "inode"):  # identity of each file, recorded since the server checks it
                if column not in tables["files"]:
                    conn.execute(f"ALTER TABLE files ADD COLUMN {column} INTEGER")
            for column, kind in FILE_TAG_COLUMNS:  # container metadata, recorded since searches filter on it
                if column not in tables["files"]:
                    conn.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
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
    """Drop a file's row, its segments, their frame vectors and its moment features; their store slots become
    dead."""
    row = conn.execute("SELECT id FROM files WHERE path = ?", (relpath,)).fetchone()
    if row is None:
        return False
    conn.execute(f"DELETE FROM {moment_store.TABLE} WHERE file_id = ?", (row[0],))
    conn.execute(
        "DELETE FROM segment_frames WHERE segment_id IN (SELECT id FROM segments WHERE file_id = ?)",
        (row[0],),
    )
    conn.execute("INSERT OR IGNORE INTO dead (slot) SELECT slot FROM segments WHERE file_id = ?", (row[0],))
    conn.execute("DELETE FROM segments WHERE file_id = ?", (row[0],))
    conn.execute("DELETE FROM files WHERE id = ?", (row[0],))
    return True


def _delete_orphans(conn: sqlite3.Connection) -> int:
    """Drop segments that belong to no file (a damaged `files` table); their slots become dead."""
    where = "file_id NOT IN (SELECT id FROM files)"
    conn.execute(f"INSERT OR IGNORE INTO dead (slot) SELECT slot FROM segments WHERE {where}")
    return conn.execute(f"DELETE FROM segments WHERE {where}").rowcount


def _insert_file(
    conn: sqlite3.Connection,
    entry: _FileEntry,
    meta: dict[str, Any],
    segments: Sequence[tuple[float, float, int] | tuple[float, float, int, bytes | None]],
) -> None:
    """Replace any row for this path by the new one and its segments (inside the caller's transaction).

    A segment is (start, end, store slot), with a fourth item for Mug-STAN models: its per-frame vectors
    (`stanvid.search.rerank`). `meta["moments"]`, when present, is the file's `moment_store.MomentFeatures`."""
    _delete_file(conn, entry.relpath)
    cur = conn.execute(
        "INSERT INTO files (path, size, mtime_ns, duration, fps, num_frames, width, height, device, inode, "
        "created, title, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            meta.get("created"),
            meta.get("title"),
            meta.get("tags"),
        ),
    )
    file_id = cur.lastrowid
    if meta.get("moments") is not None:
        moment_store.write_moments(conn, file_id, meta["moments"])
    if not any(len(s) > 3 and s[3] is not None for s in segments):  # no frame vectors: one statement
        conn.executemany(
            "INSERT INTO segments (file_id, start, end, slot) VALUES (?, ?, ?, ?)",
            [(file_id, a, b, int(slot)) for a, b, slot, *_ in segments],
        )
        return
    for start, end, slot, *frames in segments:
        seg = conn.execute(
            "INSERT INTO segments (file_id, start, end, slot) VALUES (?, ?, ?, ?)",
            (file_id, start, end, int(slot)),
        )
        if frames and frames[0] is not None:
            conn.execute(
                "INSERT INTO segment_frames (segment_id, frames) VALUES (?, ?)", (seg.lastrowid, frames[0])
            )


def _commit_files(
    conn: sqlite3.Connection,
    store: VectorStore,
    files: Sequence[tuple[_FileEntry, dict[str, Any], Sequence[tuple]]],
    vectors: np.ndarray,
) -> None:
    """Commit whole files: their vectors are appended to the store and made durable first, then one
    transaction inserts the rows pointing at them, records the chunk and the new row count and bumps the
    generation. Killed before the commit, the appended rows are past the recorded count: ignored, then
    overwritten. `files` is [(entry, probe meta, [(start, end[, frames]), ...])], `vectors` (n, D) their
    segments' vectors in order."""
    n = sum(len(segs) for _, _, segs in files)
    if len(vectors) != n:
        raise ValueError(f"{n} segments but {len(vectors)} vectors")
    first, digest = store.append(vectors) if n else (store.rows, "")
    with _transaction(conn):
        slot = first
        for entry, meta, segs in files:
            _insert_file(conn, entry, meta, [(a, b, slot + i, *rest) for i, (a, b, *rest) in enumerate(segs)])
            slot += len(segs)
        if n:
            conn.execute("INSERT OR REPLACE INTO store_chunks (first, rows, sha256) VALUES (?, ?, ?)",
                         (first, n, digest))  # fmt: skip
            _set_meta(conn, store={**store.record, "rows": first + n})
        _bump_generation(conn)
    store.advance(first + n)


def _dead_query(what: str, after_seq: int, below: int | None) -> tuple[str, list]:
    """`SELECT what` over the dead slots that died after `after_seq` and lie below `below` (None: any)."""
    sql, args = f"SELECT {what} FROM dead WHERE seq > ?", [after_seq]
    if below is not None:
        sql, args = sql + " AND slot < ?", [*args, below]
    return sql, args


def _dead_slots(conn: sqlite3.Connection, after_seq: int = 0, below: int | None = None) -> np.ndarray:
    """Slots of deleted segments (sorted int64), those that died after `after_seq` and lie below `below`."""
    rows = conn.execute(*_dead_query("slot", after_seq, below))
    return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64))


def _dead_count(conn: sqlite3.Connection, after_seq: int, below: int | None) -> int:
    """`len(_dead_slots(conn, after_seq, below))`, counted by SQLite (no array is built)."""
    return conn.execute(*_dead_query("COUNT(*)", after_seq, below)).fetchone()[0]


def _dead_seq(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM dead").fetchone()[0]


def _live_mask(conn: sqlite3.Connection, rows: int) -> np.ndarray:
    """(rows,) bool: which store slots hold a live segment's vector."""
    mask = np.ones(rows, dtype=bool)
    dead = _dead_slots(conn)
    mask[dead[dead < rows]] = False
    return mask


def _live_count(conn: sqlite3.Connection, rows: int) -> int:
    """The live rows of a store of `rows` rows: `rows` less the dead slots below it (through the index)."""
    return rows - conn.execute("SELECT COUNT(*) FROM dead WHERE slot < ?", (rows,)).fetchone()[0]


def _store_chunks(conn: sqlite3.Connection, start: int = 0) -> list[tuple[int, int, str]]:
    return conn.execute(
        "SELECT first, rows, sha256 FROM store_chunks WHERE first >= ? ORDER BY first", (start,)
    ).fetchall()
