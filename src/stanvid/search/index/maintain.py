"""The vector index files beside the store: updated at the end of each run at the cost of what changed, and
read back by an open index.

    vectors-<build>.faiss   the main index (IVF or IVF-PQ keyed by store slot), memory-mapped by readers
    trained-<build>.faiss   the same index trained and empty: a reader's delta, and the base of a rebuild that
                            needs no retraining

`meta.ann` records them (names, SHA-256 and size, the store epoch and row count they cover, the dead-slot
sequence number they saw, their parameters and the measured recall). What a run does, in order of cost:

* nothing to the files, when the segments added since the main file (slots at or past `ann.slots`) and those
  deleted since (dead slots with a sequence number past `ann.dead_seq`) are together at most 10 % of it: a
  reader adds the former to its delta and filters the latter inside the search. Bytes written: the store rows
  and SQLite rows of the change only.
* a merge past 10 %: the main index is read whole, the deleted slots removed, the new vectors added into its
  trained cells (no retraining), recall measured again and a new main file written.
* a retrain when there is no main index, on `rebuild`, when the kind or `nlist` asked for changes, when the
  index has grown or shrunk 4x since its cells were trained (4 sqrt(N) cells would be 2x off), or when new
  vectors fit the cells worse than the training sample did (their mean cosine to the nearest centre more than
  0.05 lower: drift).
* a re-add into the recorded trained index (no retraining) after the store was compacted (new slots).

Each file is written to a temporary name, fsynced and renamed, then recorded in one transaction: a run killed
at any point leaves the previous record and its files, or the new ones (files no record names are removed by
the next run). A reader opening an index whose record names a missing, damaged or foreign file searches
exactly instead (in memory up to 262,144 vectors, else by scanning the store) and says so; an open index that
follows updates refuses such a state and keeps its last good one (`stanvid.search.index.snapshot`,
`stanvid.search.index.follow`); the next run writes a good file.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.fileio import atomic_path, settled_identity, sha256_file
from stanvid.search.index.ann import (
    DEFAULT_APPROX_THRESHOLD,
    TARGET_RECALL,
    ApproxSearcher,
    add_live,
    choose_kind,
    choose_params,
    fit,
    train_empty,
    tune,
)
from stanvid.search.index.store import (
    _REPAIR,
    _bump_generation,
    _dead_count,
    _dead_seq,
    _dead_slots,
    _delete_file,
    _get_meta,
    _live_mask,
    _set_meta,
    _store_chunks,
    _transaction,
)
from stanvid.search.index.vectors import VectorStore, create_store

log = logging.getLogger("stanvid")

MERGE_FRACTION = 0.1
GROWTH = 4.0
DRIFT = 0.05
FLAT_IN_MEMORY = 1 << 18
_FILES = re.compile(r"^(vectors|trained)-(\d+)\.faiss$")
# the files `meta.ann` records: (name key, SHA-256 key, size key, settled-identity key)
_RECORDED_FILES = (
    ("file", "sha256", "bytes", "file_identity"),
    ("trained", "trained_sha256", "trained_bytes", "trained_identity"),
)


@dataclass(frozen=True)
class VectorSettings:
    """What a run asks of the vector index (see `build_index`)."""

    kind: str = "auto"
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD
    nlist: int | None = None
    nprobe: int | None = None
    rebuild: bool = False
    target_recall: float = TARGET_RECALL
    merge_fraction: float = MERGE_FRACTION


# ---------------------------------------------------------------------------------------------- files
def _write(index: faiss.Index, path: Path) -> dict[str, Any]:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
        record = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
    return record


def _problem(path: Path, sha256: str | None, size: int | None, identity: list[int] | None = None) -> str:
    """What is wrong with a recorded FAISS file ("" when it is the one recorded), checked before parsing."""
    return _check_file(path, sha256, size, identity)[0]


def _check_file(
    path: Path, sha256: str | None, size: int | None, identity: list[int] | None
) -> tuple[str, list[int] | None]:
    """(what is wrong with a recorded FAISS file, "" when it is the one recorded; its settled identity).

    A file whose settled identity (`stanvid.fileio.settled_identity`: device, inode, size, mtime, ctime) is
    the one recorded when it last hashed as recorded is that file, unchanged: it is not read again. Any other
    (no identity recorded yet, or the file written, replaced, copied over or touched since) is hashed in full,
    and its identity returned to be recorded when it matches and has settled."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is missing", None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})", None
    found = settled_identity(st)
    if st.st_size == size and identity is not None and found == identity:
        return "", found
    if st.st_size != size or sha256_file(path) != sha256:
        return "does not match the index database (damaged, or copied from another index)", None
    if found is not None and settled_identity(path.stat()) != found:
        found = None  # changed while it was hashed: the next check hashes it again
    return "", found


def _read(path: Path, flags: int = 0) -> faiss.Index:
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:  # hashed as recorded, so only a FAISS that cannot read its own file
        raise VideoIndexError(f"{path}: not a readable FAISS index ({exc}); {_REPAIR}") from exc


def remove_unrecorded(folder: Path, record: dict[str, Any] | None) -> None:
    """Drop vector index files no record names (a killed run's), and temporary files left by one."""
    keep = {record.get("file"), record.get("trained")} if record else set()
    for path in folder.iterdir():
        if (_FILES.match(path.name) and path.name not in keep) or (
            path.name.startswith(".") and ".tmp-" in path.name
        ):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- writing
def update_vectors(
    folder: Path, conn: sqlite3.Connection, store: VectorStore, settings: VectorSettings
) -> dict:
    """Bring the vector index files up to the committed rows, at the cost of what changed (module docstring).
    Returns the record now in force."""
    meta = _get_meta(conn)
    old = meta.get("ann") or {}
    mask = _live_mask(conn, store.rows)
    n = int(mask.sum())
    kind = choose_kind(settings.kind, n, settings.approx_threshold)
    if settings.kind == "auto" and kind == "flat" and old.get("kind") not in (None, "flat"):
        if n >= settings.approx_threshold // 2:  # hysteresis: a few deletions do not flip the kind
            kind = old["kind"]
    if kind == "flat" or n == 0:
        record = {"kind": "flat", "count": n}
        if record != old:
            with _transaction(conn):
                _set_meta(conn, ann=record)
    else:
        checked: dict[str, list[int] | None] = {}
        action = _plan(folder, conn, store, old, kind, n, settings, checked)
        if action == "keep":
            record = _record_identities(conn, old, checked)
        else:
            record = _build(folder, conn, store, mask, old, kind, action, settings)
    remove_unrecorded(folder, record)
    return record


def _plan(folder: Path, conn: sqlite3.Connection, store: VectorStore, old: dict, kind: str, n: int,
          settings: VectorSettings, checked: dict[str, list[int] | None]) -> str:  # fmt: skip
    """train, readd, merge, retune or keep (see the module docstring); the identities of the files checked
    go to `checked`."""
    if settings.rebuild or old.get("kind") != kind or "trained" not in old:
        return "train"
    if settings.nlist is not None and settings.nlist != old["nlist"]:
        return "train"
    trained_n = max(1, old.get("trained_n", 1))
    if n > GROWTH * trained_n or n * GROWTH < trained_n:
        return "train"
    main, trained = _RECORDED_FILES
    if _check_recorded(folder, old, trained, checked):
        return "train"
    if old.get("epoch") != store.record["epoch"]:
        return "readd"
    if _check_recorded(folder, old, main, checked):
        return "readd"
    added = conn.execute("SELECT COUNT(*) FROM segments WHERE slot >= ?", (old["slots"],)).fetchone()[0]
    removed = _dead_count(conn, old["dead_seq"], old["slots"])
    if added + removed > settings.merge_fraction * max(1, old["count"]):
        return "merge"
    if settings.nprobe is not None and settings.nprobe != old.get("nprobe"):
        return "retune"
    return "keep"


def _check_recorded(folder: Path, old: dict, entry: tuple[str, ...], checked: dict) -> str:
    """`_check_file` of one file `old` records (an entry of `_RECORDED_FILES`), its identity put in `checked`."""
    key, sha, size, ident = entry
    problem, checked[ident] = _check_file(folder / old[key], old.get(sha), old.get(size), old.get(ident))
    return problem


def _record_identities(conn: sqlite3.Connection, old: dict, checked: dict[str, list[int] | None]) -> dict:
    """Record the settled identities of the files that hashed as recorded, so that the next check (this
    run's successors, every reader) need not read them again; returns the record in force."""
    new = {k: v for k, v in checked.items() if v is not None and old.get(k) != v}
    if not new:
        return old
    record = {**old, **new}
    with _transaction(conn):
        _set_meta(conn, ann=record)
    return record


def _build(folder: Path, conn: sqlite3.Connection, store: VectorStore, mask: np.ndarray, old: dict, kind: str,
           action: str, settings: VectorSettings) -> dict:  # fmt: skip
    """Make the main index for `action`, measure its recall, write it (a retune keeps the recorded one) and
    commit its record."""
    build = _next_build(folder, old)
    record: dict[str, Any] = {k: v for k, v in old.items() if action != "train"}
    if action == "merge":
        index = _read(folder / old["file"])
        tomb = _dead_slots(conn, old["dead_seq"], old["slots"])
        if len(tomb):
            index.remove_ids(faiss.IDSelectorBatch(tomb))
        delta = np.flatnonzero(mask[old["slots"] :]) + old["slots"]
        trained = _read(folder / old["trained"])
        sample = store.read(delta[:: max(1, len(delta) // 8192)])
        if fit(trained, sample) < old.get("train_fit", 0.0) - DRIFT:
            log.info("%s: new vectors drifted from the trained cells; retraining", folder)
            return _build(folder, conn, store, mask, old, kind, "train", settings)
        add_live(index, store, mask, start=old["slots"])
    elif action == "retune":  # the recorded main file (same kind, nprobe set: `_plan`), measured, not written
        index = _read(folder / old["file"])
    elif action == "readd":
        index = _read(folder / old["trained"])
        add_live(index, store, mask)
    else:
        index = _train(folder, store, mask, kind, settings, build, record)
        add_live(index, store, mask)
    n = int(mask.sum())
    if action != "retune" and index.ntotal != n:  # a retune's main file leaves the delta to the readers
        raise VideoIndexError(
            f"{folder}: the vector index holds {index.ntotal} vectors, the store {n}; {_REPAIR}"
        )
    probe = ApproxSearcher(index, None, np.zeros(0, np.int64), store, {**record, "kind": kind}, n)
    record.update(tune(probe, store, mask, target=settings.target_recall, nprobe=settings.nprobe,
                       same_file=functools.partial(same_file, conn)))  # fmt: skip
    record["nprobe_set"] = settings.nprobe is not None
    if action != "retune":
        name = f"vectors-{build}.faiss"
        written = _write(index, folder / name)
        record.update(kind=kind, file=name, sha256=written["sha256"], bytes=written["bytes"], count=n,
                      epoch=store.record["epoch"], slots=store.rows, dead_seq=_dead_seq(conn),
                      build=build)  # fmt: skip
    with _transaction(conn):
        _set_meta(conn, ann=record)
    return record


def _train(folder: Path, store: VectorStore, mask: np.ndarray, kind: str, settings: VectorSettings, build: int,
           record: dict) -> faiss.Index:  # fmt: skip
    """Train cells (and PQ codes) on a fixed random sample of the live vectors; write the empty index."""
    live = np.flatnonzero(mask)
    params = choose_params(kind, len(live), store.dim, settings.nlist)
    size = min(len(live), max(65_536 if kind == "ivfpq" else 0, 32 * params["nlist"]))
    sample = store.read(np.sort(np.random.default_rng(0).choice(live, size=size, replace=False)))
    index = train_empty(sample, params)
    name = f"trained-{build}.faiss"
    written = _write(index, folder / name)
    record.update(params, trained=name, trained_sha256=written["sha256"], trained_bytes=written["bytes"],
                  trained_n=len(live), train_fit=fit(index, sample[:8192]))  # fmt: skip
    return index


def same_file(conn: sqlite3.Connection, slots: np.ndarray) -> list[np.ndarray]:
    """For each slot, the sorted slots of every segment of its file."""
    out = []
    for slot in slots:
        found = conn.execute(
            "SELECT s2.slot FROM segments s1 JOIN segments s2 ON s2.file_id = s1.file_id WHERE s1.slot = ?",
            (int(slot),),
        ).fetchall()
        out.append(np.sort(np.array([r[0] for r in found], dtype=np.int64)))
    return out


def _next_build(folder: Path, old: dict) -> int:
    found = [int(m.group(2)) for p in folder.iterdir() if (m := _FILES.match(p.name))]
    return max([old.get("build", 0), *found]) + 1


# ---------------------------------------------------------------------------------------------- repair
REPAIR_KEY = "repairing"  # meta: set while a repair's dropped files are encoded again, cleared by `_finish`


def mark_repair(conn: sqlite3.Connection, why: str) -> None:
    """Record, in the transaction that drops a repair's files, that the index is being repaired: an open index
    keeps answering from the generation before it until the run that re-encodes them clears the mark (a
    repair never publishes an emptier index than the one it repairs). The first mark of a run is kept."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (REPAIR_KEY,)).fetchone()
    if row is None:
        files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        _set_meta(conn, **{REPAIR_KEY: {"why": why, "files": files}})


def end_repair(conn: sqlite3.Connection) -> None:
    """Clear the repair mark (the run re-encoded what it dropped); a commit of its own, a new generation, so
    that open indexes move to the repaired state at once."""
    with _transaction(conn):
        if conn.execute("DELETE FROM meta WHERE key = ?", (REPAIR_KEY,)).rowcount:
            _bump_generation(conn)


def reconcile_dead(conn: sqlite3.Connection, store: VectorStore) -> None:
    """After rows were dropped by a repair: every store row no segment points at is marked dead."""
    used = np.zeros(store.rows, dtype=bool)
    for (slot,) in conn.execute("SELECT slot FROM segments WHERE slot >= 0 AND slot < ?", (store.rows,)):
        used[slot] = True
    dead = ~used & _live_mask(conn, store.rows)
    with _transaction(conn):
        conn.executemany(
            "INSERT OR IGNORE INTO dead (slot) VALUES (?)", [(int(i),) for i in np.flatnonzero(dead)]
        )


# ---------------------------------------------------------------------------------------------- the store
COMPACT_FRACTION = 0.5


def compact_store(
    folder: Path, conn: sqlite3.Connection, store: VectorStore, readable: bool = True
) -> VectorStore:
    """Write the live rows into the next epoch's store file and commit their new slots in one transaction
    (the dead ones dropped); `readable=False` (a store whose header is gone) starts an empty one. The vector
    index files keep their record: it names the old epoch, so the end of the run re-adds (no retraining)."""
    mask = _live_mask(conn, store.rows) if store.rows else np.zeros(0, bool)
    prefix = store.record["file"][: -len(f"embeddings-{store.record['epoch']}.f32")]
    new = VectorStore(
        folder, create_store(folder, prefix, store.dim, store.record["epoch"] + 1, store.record["store"])
    )
    chunks = []
    if readable:
        for first, block in store.chunks():
            keep = mask[first : first + len(block)]
            if keep.any():
                start, digest = new.append(block[keep])
                chunks.append((start, int(keep.sum()), digest))
                new.advance(start + int(keep.sum()))
    old_slots = np.flatnonzero(mask) if readable else np.zeros(0, np.int64)
    moved = [(int(n), int(o)) for n, o in enumerate(old_slots) if n != o]
    with _transaction(conn):
        conn.executemany("UPDATE segments SET slot = ? WHERE slot = ?", moved)  # ascending: never collides
        conn.execute("DELETE FROM dead")
        conn.execute("DELETE FROM store_chunks")
        conn.executemany("INSERT INTO store_chunks (first, rows, sha256) VALUES (?, ?, ?)", chunks)
        _set_meta(conn, store=new.record)
        _bump_generation(conn)
    if store.path != new.path:
        store.path.unlink(missing_ok=True)
    return new


def repair_store(folder: Path, conn: sqlite3.Connection, store: VectorStore) -> VectorStore:
    """Before a run encodes: a store that is not this index's, is truncated, or (up to FLAT_IN_MEMORY rows,
    where checking costs little) whose chunks no longer hash as committed loses the files whose vectors it
    lost (they are encoded again by this run) and is rewritten from what it still holds."""
    problem = store.problem()
    readable = not problem or problem.startswith("holds")
    lost: list[tuple[int, int]] = []
    if not readable:
        lost = [(0, store.rows)]
    elif problem or store.rows <= FLAT_IN_MEMORY:
        lost = store.bad_chunks(_store_chunks(conn))
    if not problem and not lost:
        store.drop_tail()
        return store
    files: set[str] = set()
    for first, count in lost:
        files |= {r[0] for r in conn.execute(
            "SELECT DISTINCT f.path FROM segments s JOIN files f ON f.id = s.file_id WHERE s.slot >= ? AND s.slot < ?",
            (first, first + count))}  # fmt: skip
    log.warning("%s %s; %d file(s) whose embeddings were lost are encoded again", store.path,
                problem or f"has {len(lost)} damaged chunk(s)", len(files))  # fmt: skip
    with _transaction(conn):
        mark_repair(conn, f"{store.path.name} {problem or 'has damaged chunks'}")
        for relpath in sorted(files):
            _delete_file(conn, relpath)
        _bump_generation(conn)
    return compact_store(folder, conn, store, readable)
