"""One generation of an index, as an open index answers from it: the meta record, the searcher and the store
read inside one SQLite read transaction, which stays open for as long as the snapshot lives.

Everything a response needs comes from one snapshot: the searcher gives store slots, and the segment, file
and per-frame rows they resolve to are read through the snapshot's own connection, still inside the read
transaction it was loaded in. SQLite (WAL mode) keeps that view whatever runs commit meanwhile: deleted files
are still there, a compaction's renumbered slots are not, the counts are the generation's. The files the
searcher reads stay readable too: the store is opened when the snapshot is loaded (an unlinked file lives
while open), a vector index file is memory-mapped, and named files never change.

An open index (`stanvid.search.index.video_index.VideoIndex`) holds its current snapshot and loads the next
one off the request path when a run commits; a request acquires the snapshot it starts on and releases it
at its end, and a snapshot replaced by a newer one is closed (its read transaction ended) once its last
request is done.

Reading a state costs what changed since the previous snapshot, when there is one: the memory-mapped main
file and the trained index are reused when the record names the same files (their hashes were checked when
first mapped), store chunks already checked are not hashed again, and an exact index is copied from the
previous one, its deleted rows removed and its new rows added.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.search.index.ann import ApproxSearcher, ExactSearcher, MappedFile, ScanSearcher, recorded_files
from stanvid.search.index.maintain import _RECORDED_FILES, FLAT_IN_MEMORY, _problem, _read
from stanvid.search.index.store import (
    _REPAIR,
    _check_meta,
    _connect,
    _db_errors,
    _dead_slots,
    _get_meta,
    _live_count,
    _live_mask,
    _store_chunks,
)
from stanvid.search.index.vectors import VectorStore

log = logging.getLogger("stanvid")

TOKEN_SQL = (
    "SELECT key, value FROM meta WHERE key IN ('ann', 'generation', 'repairing', 'store') ORDER BY key"
)


def read_token(conn: sqlite3.Connection) -> tuple:
    """What identifies a committed state: the generation (bumped by every commit that changes the rows), the
    vector index record (a merge or retune replaces the files without changing the rows), the store's
    (its id tells an index built again from scratch from the one it replaced) and the repair mark
    (`maintain.mark_repair`)."""
    return tuple(conn.execute(TOKEN_SQL).fetchall())


class Snapshot:
    """One generation, read whole (see the module docstring). `rows` queries it; `acquire`/`release` bracket
    a request's use of it; `retire` closes it once no request uses it."""

    def __init__(self, path: Path, db: Path, conn: sqlite3.Connection, meta: dict[str, Any], token: tuple,
                 store: VectorStore, searcher: Any, files: int) -> None:  # fmt: skip
        self.path, self.db, self.meta, self.token = path, db, meta, token
        self.store, self.searcher, self.files = store, searcher, files
        self._conn = conn
        self._lock = threading.Lock()  # one connection: its statements run one at a time
        self._users = 0
        self._retired = self._closed = False
        self.anchored = time.monotonic()

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])

    @property
    def segments(self) -> int:
        return int(self.searcher.count)

    def rows(self, sql: str, args: Any = ()) -> list[tuple]:
        """The rows of a query, read in this snapshot's generation."""
        with self._lock, _db_errors(self.db):
            if self._closed:
                raise VideoIndexError(f"{self.path}: the index was closed")
            return self._conn.execute(sql, args).fetchall()

    def acquire(self) -> Snapshot:
        with self._lock:
            if self._closed:
                raise VideoIndexError(f"{self.path}: the index was closed")
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._retired and self._users == 0:
                self._close()

    def retire(self) -> None:
        """No new request will acquire it: closed now, or when its last request releases it."""
        with self._lock:
            self._retired = True
            if self._users == 0:
                self._close()

    def _close(self) -> None:  # under the lock
        if not self._closed:
            self._closed = True
            self._conn.close()
            self.store.close()

    def reanchor(self) -> bool:
        """Hold the same generation through a fresh read transaction, if the committed state still is this
        snapshot's (its rows unchanged): a read transaction held open keeps SQLite from restarting its
        write-ahead log, so a long-lived snapshot renews its own now and then (after a checkpoint, so the
        new one reads from the database file alone and lets the next writer restart the log)."""
        conn = _connect(self.db, create=False)
        try:
            with _db_errors(self.db):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                conn.execute("BEGIN")
                same = read_token(conn) == self.token
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if not same or self._closed:
                conn.close()
                return False
            self._conn, old = conn, self._conn
            self.anchored = time.monotonic()
        old.close()
        return True


def load_snapshot(path: Path, db: Path, previous: Snapshot | None = None, strict: bool = False) -> Snapshot:
    """The committed state of the index at `path`, in one read transaction kept open by the snapshot.

    `previous` (the snapshot being replaced) lends what has not changed. With `strict`, a recorded vector
    index file that is missing or damaged is refused (a `VideoIndexError`: the caller keeps its previous
    snapshot); otherwise it is searched exactly instead, with a warning, as when an index is first opened."""
    conn = _connect(db, create=False)
    try:
        with _db_errors(db):
            meta, store = _begin(conn, path, db)
            same_store = previous is not None and _same_store(previous.store, store)
            searcher = load_searcher(path, conn, meta, store, db, previous.searcher if previous else None,
                                     previous.store.rows if same_store else 0, strict)  # fmt: skip
            files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            token = read_token(conn)
        return Snapshot(path, db, conn, meta, token, store, searcher, files)
    except BaseException:
        conn.close()
        raise


def _begin(conn: sqlite3.Connection, path: Path, db: Path) -> tuple[dict[str, Any], VectorStore]:
    """Start the read transaction and open the store it records. A store replaced by a compaction between
    reading the record and opening its file is looked for again in a new transaction."""
    for attempt in range(3):
        conn.execute("BEGIN")
        meta = _get_meta(conn, db)  # the read transaction starts with this first read
        if not meta:
            raise VideoIndexError(
                f"{path}: the index is empty (interrupted before its first commit); re-run the build"
            )
        _check_meta(meta, db)
        store = VectorStore(path, meta["store"])
        try:
            problem = store.open().problem()
        except FileNotFoundError:
            problem = "is missing"
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        if not problem:
            return meta, store
        store.close()
        conn.execute("COMMIT")
        if problem != "is missing" or attempt == 2:
            raise VideoIndexError(
                f"{store.path} {problem}; {_REPAIR} (it encodes the videos whose embeddings are lost)"
            )
    raise AssertionError("unreachable")


def _same_store(a: VectorStore, b: VectorStore) -> bool:
    """The same store file: same index, same epoch (so rows below the older count are the same bytes)."""
    return all(a.record.get(k) == b.record.get(k) for k in ("file", "store", "epoch")) and a.rows <= b.rows


# ---------------------------------------------------------------------------------------------- searchers
def load_searcher(folder: Path, conn: sqlite3.Connection, meta: dict[str, Any], store: VectorStore,
                  where: Path | str, previous: Any = None, checked: int = 0, strict: bool = False):  # fmt: skip
    """The searcher for the committed rows: the recorded main index (memory-mapped) with its delta and
    deletions, or exact search when it is flat, missing or damaged (with a warning for the latter; refused
    with `strict`). `previous` is the searcher of an earlier state, `checked` the store rows whose chunk
    hashes were checked already (same store file), see the module docstring."""
    rec = meta.get("ann") or {}
    n = check_rows(conn, store, where)
    if rec.get("kind") in ("ivf", "ivfpq") and n:
        reuse = (
            previous
            if isinstance(previous, ApproxSearcher)
            and previous.files == recorded_files(rec)
            and previous.fallback is None
            and not previous.changed()  # written in place: checked (hashed) again, not reused
            else None
        )
        problem = _approx_problem(folder, rec, store, hashed=reuse is not None)
        if not problem:
            searcher = _open_approx(folder, conn, rec, store, n, reuse, checked)
            if isinstance(searcher, ApproxSearcher):
                return searcher
            problem = searcher
        if strict:
            raise VideoIndexError(f"{folder / rec['file']} {problem}; {_REPAIR}")
        log.warning(
            "%s %s; searching exactly instead; re-run `stanvid index` to store it",
            folder / rec["file"],
            problem,
        )
    mask = _live_mask(conn, store.rows)
    if n <= FLAT_IN_MEMORY:
        _check_chunks(store, _store_chunks(conn, checked))
        return ExactSearcher(
            store, mask, previous if isinstance(previous, ExactSearcher) and checked else None
        )
    return ScanSearcher(store, mask)


def _check_chunks(store: VectorStore, chunks: list[tuple[int, int, str]]) -> None:
    bad = store.bad_chunks(chunks)
    if bad:
        raise VideoIndexError(
            f"{store.path}: {len(bad)} chunk(s) of embeddings are damaged (first at slot {bad[0][0]}); "
            f"{_REPAIR} (it encodes their videos again)"
        )


def check_rows(conn: sqlite3.Connection, store: VectorStore, where: Path | str) -> int:
    """The number of live segments, after checking that every segment points inside the store and every
    store row is either some segment's or dead (both through indexes: milliseconds at 1M rows)."""
    outside = conn.execute(
        "SELECT COUNT(*) FROM segments WHERE slot < 0 OR slot >= ?", (store.rows,)
    ).fetchone()[0]
    segments = conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
    live = _live_count(conn, store.rows)
    if outside or segments != live:
        what = f"{outside} segment(s) point outside the embedding store" if outside else (
            f"{segments} segments for {live} live rows of the embedding store")  # fmt: skip
        raise VideoIndexError(f"{where}: {what} (damaged); {_REPAIR}")
    return live


def _approx_problem(folder: Path, rec: dict, store: VectorStore, hashed: bool = False) -> str:
    """What is wrong with the recorded vector index files ("" when nothing); `hashed`: the files are those
    of the previous snapshot, checked when it mapped them (named files never change), not hashed again."""
    if rec.get("epoch") != store.record["epoch"] or rec.get("slots", 0) > store.rows:
        return "was built over another generation of the embedding store"
    if hashed:
        return ""
    for key, sha, size, ident in _RECORDED_FILES:
        problem = _problem(folder / str(rec.get(key)), rec.get(sha), rec.get(size), rec.get(ident))
        if problem:
            return problem
    return ""


def _open_approx(folder: Path, conn: sqlite3.Connection, rec: dict, store: VectorStore, n: int,
                 reuse: ApproxSearcher | None = None, checked: int = 0):  # fmt: skip
    """The main index memory-mapped (or `reuse`'s), the delta added to a fresh copy of the trained one; or
    what is wrong."""
    watch = reuse.watch if reuse is not None else MappedFile(folder / rec["file"])
    main = reuse.main if reuse is not None else _read(folder / rec["file"], faiss.IO_FLAG_MMAP)
    tomb = _dead_slots(conn, rec["dead_seq"], rec["slots"])
    delta = np.fromiter(
        (
            r[0]
            for r in conn.execute("SELECT slot FROM segments WHERE slot >= ? ORDER BY slot", (rec["slots"],))
        ),
        dtype=np.int64,
    )
    if main.ntotal != rec["count"] or n != rec["count"] - len(tomb) + len(delta):
        return (
            f"holds {main.ntotal} vectors where the database has {rec['count']} (copied from another index?)"
        )
    _check_chunks(store, _store_chunks(conn, max(rec["slots"], checked)))
    if reuse is not None:
        trained = reuse.trained
    else:
        trained = faiss.serialize_index(_read(folder / rec["trained"]))
    index = _delta(trained, delta, store, reuse if checked else None, checked)
    return ApproxSearcher(main, index, tomb, store, rec, n, trained, delta, watch)


def _delta(trained: Any, slots: np.ndarray, store: VectorStore, previous: ApproxSearcher | None,
           checked: int) -> faiss.Index:  # fmt: skip
    """The delta index over `slots` (the live slots added since the main file): the previous snapshot's
    copied, the slots deleted since removed and those appended since (at or past `checked`, its store's
    rows) added, when it covers the same slots before; else the trained index with every slot added."""
    old = None if previous is None else previous.delta_slots
    if old is not None and previous.delta is not None:
        kept = slots[slots < checked]
        if np.isin(kept, old).all():
            index = previous.delta
            gone = np.setdiff1d(old, kept)
            added = slots[slots >= checked]
            if len(gone) or len(added):  # the previous snapshot may still be searching its own: a copy
                index = faiss.deserialize_index(faiss.serialize_index(index))
                if len(gone):
                    index.remove_ids(faiss.IDSelectorBatch(gone.astype(np.int64)))
                if len(added):
                    index.add_with_ids(store.read(added), added)
            return index
    index = faiss.deserialize_index(trained)
    if len(slots):
        index.add_with_ids(store.read(slots), slots)
    return index
