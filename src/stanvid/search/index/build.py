"""Building and updating an index: the run's settings and state, and its steps in order.

`build_index` is: check the settings, load the model, join the ranks' group (`torchrun`), then rank 0 opens
the index folder (lock, record, repair), every rank encodes its share of the new or changed files (into the
main database, or its shard under `torchrun`) or the run imports embeddings computed elsewhere
(`from_embeddings`, `stanvid.search.index.imports`), and rank 0 merges the shards, records the failures,
compacts the store when half of it is dead and brings the vector index files up to date
(`stanvid.search.index.maintain`). After each step the ranks meet at a barrier that shares any rank's
failure with all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stanvid.checkpoints.onnx_runtime import OnnxEncoder
from stanvid.data.loader import build_loader
from stanvid.distributed import default_device, launch_env, launch_world_size, rank_world
from stanvid.errors import VideoIndexError
from stanvid.locking import exclusive_lock
from stanvid.models.video_clip import VideoCLIP
from stanvid.precision import InferencePrecision, prepare_for_inference, resolve_precision
from stanvid.search.index.ann import DEFAULT_APPROX_THRESHOLD, INDEX_KINDS, TARGET_RECALL, describe
from stanvid.search.index.clips import MIN_SEGMENT_SECONDS, _check_segment_seconds
from stanvid.search.index.filters import record_missing_tags
from stanvid.search.index.identity import (
    _check_identity,
    _source_string,
    load_fingerprinted,
    model_fingerprint,
)
from stanvid.search.index.loader import _ClipLoader
from stanvid.search.index.maintain import (
    COMPACT_FRACTION,
    VectorSettings,
    compact_store,
    end_repair,
    mark_repair,
    reconcile_dead,
    remove_unrecorded,
    repair_store,
    update_vectors,
)
from stanvid.search.index.records import IndexReport, _FileEntry
from stanvid.search.index.shards import _barrier, _join_group, _leave_group, _merge_shards
from stanvid.search.index.store import (
    _REBUILD,
    DB_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    SHARD_DIR,
    _bump_generation,
    _check_meta,
    _connect,
    _db_errors,
    _delete_file,
    _delete_orphans,
    _get_meta,
    _live_count,
    _set_meta,
    _transaction,
)
from stanvid.search.index.vectors import VectorStore, create_store
from stanvid.search.index.walk import VIDEO_EXTENSIONS, _share, _walk
from stanvid.search.index.writer import _Writer
from stanvid.search.moments import MOMENT_WINDOW, moment_step
from stanvid.video.pipeline import PREFETCH_PER_WORKER, ThreadBudget, encode_batch_size, thread_budget

log = logging.getLogger("stanvid")


@dataclass(frozen=True)
class _Options:
    """The settings of one run (see `build_index`), checked on construction."""

    segment_seconds: float | None
    batch_size: int
    num_workers: int | None
    index_kind: str
    approx_threshold: int
    nlist: int | None
    nprobe: int | None
    progress: bool
    on_commit: Callable[[int], None] | None
    dist_timeout: timedelta
    rebuild: bool = False
    target_recall: float = TARGET_RECALL
    from_embeddings: str | None = None
    shard: tuple[int, int] | None = None  # (i, n): this run indexes the files of share i of n, alone
    moments: bool | float = True  # keep moment features: True (MOMENT_WINDOW s clips), a window in s, False

    def __post_init__(self) -> None:
        if self.segment_seconds is not None:
            _check_segment_seconds(self.segment_seconds, minimum=0.0)
            if self.segment_seconds < MIN_SEGMENT_SECONDS:
                raise VideoIndexError(
                    f"segment_seconds must be at least {MIN_SEGMENT_SECONDS} s, got {self.segment_seconds:g}"
                )
        for name, value, low in (
            ("batch_size", self.batch_size, 1),
            ("num_workers (--workers)", 0 if self.num_workers is None else self.num_workers, 0),
            ("approx_threshold", self.approx_threshold, 1),
            ("nlist", 1 if self.nlist is None else self.nlist, 1),
            ("nprobe", 1 if self.nprobe is None else self.nprobe, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise VideoIndexError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.index_kind not in INDEX_KINDS:
            raise VideoIndexError(
                f"index_kind must be one of {', '.join(INDEX_KINDS)}, got {self.index_kind!r}"
            )
        if isinstance(self.target_recall, bool) or not (0 < self.target_recall <= 1):
            raise VideoIndexError(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if not isinstance(self.moments, bool) and not (
            isinstance(self.moments, int | float) and math.isfinite(self.moments) and self.moments > 0
        ):
            raise VideoIndexError(
                f"moments (--moment-window) must be True, False or a window in seconds > 0, got {self.moments!r}"
            )
        if self.shard is not None:
            i, n = self.shard
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (i, n)) or not 0 <= i < n:
                raise VideoIndexError(f"shard must be I/N with 0 <= I < N, got {i!r}/{n!r}")

    @property
    def moment_window(self) -> float:
        """Seconds one clip of moment samples spans (`stanvid.search.moments`)."""
        return MOMENT_WINDOW if self.moments is True else float(self.moments)

    @property
    def vectors(self) -> VectorSettings:
        return VectorSettings(
            self.index_kind, self.approx_threshold, self.nlist, self.nprobe, self.rebuild, self.target_recall
        )


@dataclass
class _Run:
    """One run under way: where, with which model and settings, which rank of how many, and what it found."""

    root: Path  # the video folder
    out: Path  # the index folder
    options: _Options
    identity: dict[str, Any]  # what the index records and checks (format, folder, model, segmentation)
    runner: InferencePrecision
    budget: ThreadBudget
    group: dict[str, Any] | None  # the ranks' barrier group (`shards._join_group`), None alone
    rank: int
    world: int
    report: IndexReport
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # rank 0's lock on `out`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files the walk refused, with the reason
    listing: list[_FileEntry] | None = None  # the folder's videos, walked once per run (`videos`)

    @property
    def db(self) -> Path:
        return self.out / DB_NAME

    def videos(self) -> list[_FileEntry]:
        """The folder's video files (this run's share of them), walked on first use; the files the walk
        refuses go to `skipped`. One walk per run, however many steps ask (at 10M segments, 100,000 files)."""
        if self.listing is None:
            self.listing = _share(
                _walk(self.root, exclude=self.out, skipped=self.skipped), self.options.shard
            )
        return self.listing

    def close(self, clean: bool = False) -> None:
        self.lock.close()
        _leave_group(self.group, clean)


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
    rebuild: bool = False,
    target_recall: float = TARGET_RECALL,
    from_embeddings: str | os.PathLike | None = None,
    shard: tuple[int, int] | None = None,
    moments: bool | float = True,
    runtime: str | None = None,
) -> IndexReport:
    """Index the videos under `video_dir` into the directory `out` (created, or updated in place).

    `model` is any `stanvid.load_model` source (loaded with `model_overrides`) or a `VideoCLIP` already in
    memory (put in eval mode and moved to `device`; `model_source` names it for the record, and queries must
    pass the same model to `open_index`). `runtime` (torch | onnxruntime) runs a source as `load_model` does;
    the index records the same source and fingerprint for both, so either runtime searches it.
    Each video, or each `segment_seconds` span of it, is embedded from `model.config.num_frames` frames
    sampled uniformly within it. An existing index is updated: only new or changed files (size or mtime) are
    encoded, deleted ones are dropped. Finished files are committed every `batch_size` clips; `on_commit(n)` is
    called after each commit with the number of files committed so far. Unreadable videos are reported in
    `IndexReport.failed` and not indexed.

    `precision` (`stanvid.precision`: auto, fp32, bf16, fp16, int8) is the arithmetic of the forward passes;
    the stored embeddings are float32 unit vectors whatever it is, and the index records it. `num_workers`
    decoding processes run ahead of the model (None: the `stanvid.video.pipeline.thread_budget` choice; 0 decodes
    in this process, between forward passes).

    Under `torchrun` (WORLD_SIZE set, or a process group already started), each rank encodes its share of the
    files to process into its own shard file; after a barrier (gloo), rank 0 merges the shards and writes the FAISS index.

    Rank 0 holds a lock on `out` for the whole run (`stanvid.locking`): a second run on the same index raises
    `LockHeldError` naming the process that holds it. Symbolic links resolving outside `video_dir` and names
    that are not valid UTF-8 are not indexed and are listed in `IndexReport.failed` with the reason.

    The vector index (`stanvid.search.index.ann`): `index_kind` auto is exact below `approx_threshold` vectors
    and IVF-PQ with an exact re-rank above; `nlist` cells (default 4 sqrt(N)); `nprobe` is measured for
    recall@10 >= `target_recall` unless given. A run updates it at the cost of what changed and retrains only
    past the growth or drift of `stanvid.search.index.maintain`, or with `rebuild`.

    `from_embeddings` (a `stanvid embed` output: .npy + .json or .parquet; a folder or a glob of them) imports
    those rows instead of encoding (`stanvid.search.index.imports`). `shard=(i, n)` indexes only the files
    of share i of n (a stable hash of their path), alone: `stanvid embed --shard`. `moments`: keep each file's
    moment features (`stanvid.search.moments`) in clips of 1 s (True) or of that many seconds; False: none."""
    t0 = time.perf_counter()
    options = _Options(
        segment_seconds,
        batch_size,
        num_workers,
        index_kind,
        approx_threshold,
        nlist,
        nprobe,
        progress,
        on_commit,
        dist_timeout,
        rebuild,
        target_recall,
        None if from_embeddings is None else str(from_embeddings),
        None if shard is None else tuple(shard),
        moments,
    )
    root, out = _folders(video_dir, out)
    options = _imported_segments(options)
    model, source, overrides, fingerprint = _model(model, model_source, model_overrides, runtime)
    run = _start(root, out, model, fingerprint, source, overrides, options, device, precision)
    run.report.timings["model"] = time.perf_counter() - t0  # loading (unless passed) and fingerprinting it
    clean = False
    try:
        _steps(run)
        run.report.failed = [(str(root / p), e) for p, e in run.report.failed]
        run.report.seconds = time.perf_counter() - t0
        clean = True
        return run.report
    finally:
        run.close(clean)


def _steps(run: _Run) -> None:
    """Prepare the index folder (rank 0), import or encode (every rank), finish (rank 0), timing each step."""
    t1 = time.perf_counter()
    _barrier(run.group, _open_index_folder(run) if run.rank == 0 else None)
    run.report.timings["prepare"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if run.options.from_embeddings is not None:
        from stanvid.search.index.imports import import_embeddings

        import_embeddings(run, run.options.from_embeddings)
    else:
        _barrier(run.group, _encode_share(run))
    run.report.timings["import" if run.options.from_embeddings else "encode"] = time.perf_counter() - t1
    if run.rank == 0:
        _finish(run)


def _folders(video_dir: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """The video folder and the index folder, absolute; an unusable one is a `VideoIndexError` naming it."""
    root = Path(video_dir).expanduser().resolve()
    if not root.is_dir():
        raise VideoIndexError(f"{video_dir}: not a directory")
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise VideoIndexError(f"{out}: exists and is not a directory; --out names the index folder")
    return root, out


def _model(
    model: str | os.PathLike | VideoCLIP,
    model_source: str | None,
    model_overrides: dict[str, Any] | None,
    runtime: str | None = None,
) -> tuple[VideoCLIP, str, dict[str, Any], str]:
    """The model in eval mode, the source the index records for it, the overrides it was loaded with, and its
    fingerprint (cached for a source's weights file, `identity.load_fingerprinted`; computed for a model in
    memory)."""
    overrides = dict(model_overrides or {})
    if isinstance(model, (VideoCLIP, OnnxEncoder)):
        if overrides:
            raise VideoIndexError("model_overrides apply to a model source, not to a model already built")
        return model.eval(), model_source or "", overrides, model_fingerprint(model)
    loaded, fingerprint = load_fingerprinted(str(model), overrides, runtime)
    return loaded.eval(), _source_string(model), overrides, fingerprint


def _start(
    root: Path,
    out: Path,
    model: VideoCLIP,
    fingerprint: str,
    source: str,
    overrides: dict[str, Any],
    options: _Options,
    device: str | torch.device | None,
    precision: str,
) -> _Run:
    """Join the ranks' group and put the model on its device in `precision`."""
    dev = torch.device(device) if device is not None else default_device()
    resolved = resolve_precision(precision, dev)  # a bad precision fails before any process group exists
    if options.from_embeddings is not None and launch_world_size() > 1:  # each rank would import it all
        raise VideoIndexError("from_embeddings imports in one process; run it without torchrun")
    alone = options.shard is not None or options.from_embeddings is not None  # no process group for these
    group = None if alone else _join_group(options.dist_timeout)
    rank, world = (0, 1) if alone else rank_world()
    if options.from_embeddings is None:
        model.to(dev)
        runner = prepare_for_inference(model, precision, dev)
    else:  # an import encodes nothing: the model is neither moved nor quantized
        runner = InferencePrecision(model, resolved, dev)
    local_world = launch_env("LOCAL_WORLD_SIZE", world)
    identity = {
        "format_version": FORMAT_VERSION,
        "root": str(root),
        "model_source": source,
        "model_overrides": overrides,
        "model_fingerprint": fingerprint,
        "model_config": model.config.to_dict(),
        "dim": model.config.clip.embed_dim,
        "segment_seconds": options.segment_seconds,
    }
    return _Run(
        root,
        out,
        options,
        identity,
        runner,
        thread_budget(dev, options.num_workers, local_world),
        group,
        rank,
        world,
        IndexReport(index=str(out), precision=runner.precision),
    )


def _imported_segments(options: _Options) -> _Options:
    """An import without `segment_seconds` takes the embeddings' (an index must agree with them anyway)."""
    if options.from_embeddings is None or options.segment_seconds is not None:
        return options
    from stanvid.search.index.imports import embedded_segment_length

    return dataclasses.replace(options, segment_seconds=embedded_segment_length(options.from_embeddings))


def _open_index_folder(run: _Run) -> Exception | None:
    """Rank 0: create the index folder, take its lock for the run, and record, check and repair the database
    (`_prepare`). A failure is returned, to be shared with the other ranks at the barrier."""
    try:
        if run.options.from_embeddings is None and not run.videos():
            _nothing_to_index(run)
        try:
            run.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VideoIndexError(f"{run.out}: cannot create the index folder ({exc.strerror})") from exc
        run.lock.enter_context(exclusive_lock(run.out / LOCK_NAME, f"the index {run.out}"))
        with contextlib.closing(_connect(run.db)) as conn, _db_errors(run.db):
            _prepare(conn, run)
    except Exception as exc:  # shared with the other ranks, then raised
        return exc
    return None


def _nothing_to_index(run: _Run) -> None:
    """A folder without a video: an error before anything is written, unless the index exists (its files were
    all removed from the folder, which the run then records, saying so)."""
    refused = (
        f"; {len(run.skipped)} refused, e.g. {run.skipped[0][0]}: {run.skipped[0][1]}" if run.skipped else ""
    )
    if not run.db.exists():
        raise VideoIndexError(
            f"{run.root}: no videos to index (no file named *{', *'.join(VIDEO_EXTENSIONS)}{refused}); "
            "no index was written"
        )
    run.report.notes.append(f"{run.root} holds no videos now{refused}: the index keeps none of its files")


def _encode_share(run: _Run) -> Exception | None:
    """Every rank: encode its share of the new or changed files, into the main database (one process) or its
    shard. A failure is returned, to be shared with the other ranks at the barrier."""
    main = _connect(run.db)
    try:
        mine = _files_to_encode(main, run)[run.rank :: run.world]
        if run.world == 1:
            store = VectorStore(run.out, _get_meta(main, run.db)["store"])
            run.report.indexed, run.report.failed = _encode_files(main, store, run, mine)
        else:
            run.report.indexed, run.report.failed = _encode_into_shard(run, mine)
    except sqlite3.DatabaseError as exc:  # a commit in the encode loop (disk full, ...)
        failure = VideoIndexError(f"{run.db}: SQLite error: {exc}")
        failure.__cause__ = exc
        return failure
    except Exception as exc:
        return exc
    finally:
        main.close()
    return None


def _files_to_encode(conn: sqlite3.Connection, run: _Run) -> list[_FileEntry]:
    """The folder's videos that are new or changed since they were indexed (all ranks find the same list)."""
    with _db_errors(run.db):
        meta = _get_meta(conn, run.db)
        _check_meta(meta, run.db)
        _check_identity(meta, run.identity, run.out)
        if run.world > 1:  # every rank walks now, so that all of them split the same list
            run.listing = None
            run.skipped.clear()
        disk = run.videos()
        known = {r[0]: r[1:] for r in conn.execute("SELECT path, size, mtime_ns, device, inode FROM files")}
    todo = [e for e in disk if _changed(e, known.get(e.relpath))]
    run.report.files_seen = len(disk)
    run.report.unchanged = len(disk) - len(todo)
    return todo


def _encode_into_shard(run: _Run, entries: list[_FileEntry]) -> tuple[int, list[tuple[str, str]]]:
    """A rank of a sharded run: encode `entries` into its own shard file, its failures recorded there."""
    shard = run.out / SHARD_DIR / f"rank-{run.rank:05d}.sqlite"
    shard.parent.mkdir(exist_ok=True)
    with contextlib.closing(_connect(shard)) as conn:
        record = _get_meta(conn).get("store")
        if record is None or VectorStore(shard.parent, record).problem():
            record = create_store(shard.parent, f"rank-{run.rank:05d}.", run.identity["dim"])
        with _transaction(conn):
            _set_meta(conn, **run.identity, store=record)
        store = VectorStore(shard.parent, record)
        store.drop_tail()
        indexed, failed = _encode_files(conn, store, run, entries)
        with _transaction(conn):
            conn.executemany("INSERT OR REPLACE INTO failures (path, error) VALUES (?, ?)", failed)
    return indexed, failed


def _finish(run: _Run) -> None:
    """Rank 0, after every rank encoded: merge the shards, record the failures (dropping the old rows of files
    that became unreadable) and the precision, compact the store when half of it is dead, bring the vector
    index files up to date, and count what the index holds."""
    report = run.report
    t0 = time.perf_counter()
    with contextlib.closing(_connect(run.db)) as conn, _db_errors(run.db):
        store = VectorStore(run.out, _get_meta(conn)["store"])
        if run.world > 1:
            report.indexed, report.failed = _merge_shards(conn, run.out, store)
        report.failed = sorted(report.failed + run.skipped)
        _record_failures(conn, report, run.runner.precision)
        if run.options.from_embeddings is None:  # an import never opens the files
            record_missing_tags(conn, run.root)
        dead = conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
        if dead and dead > COMPACT_FRACTION * store.rows:
            store = compact_store(run.out, conn, store)
        record = update_vectors(run.out, conn, store, run.options.vectors)
        end_repair(conn)  # what a repair dropped is encoded again: open indexes may follow now
        report.vector_index = describe(record)
        report.built_precision = "+".join(_get_meta(conn).get("precisions", []))
        report.files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        report.segments = store.rows - conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
    report.timings["vectors"] = time.perf_counter() - t0


def _record_failures(conn: sqlite3.Connection, report: IndexReport, precision: str) -> None:
    """Replace the failure list by this run's, drop the rows of files that failed (a changed file that is now
    unreadable: its old embedding is stale) and record the precision, in one transaction."""
    with _transaction(conn):
        conn.execute("DELETE FROM failures")
        conn.executemany("INSERT OR REPLACE INTO failures (path, error) VALUES (?, ?)", report.failed)
        dropped = [p for p, _ in report.failed if _delete_file(conn, p)]
        if dropped:
            _bump_generation(conn)
        _record_precision(conn, precision, encoded=report.indexed > 0)


def _record_precision(conn: sqlite3.Connection, precision: str, encoded: bool) -> None:
    """Keep the precisions the stored embeddings were computed in (`precisions`, in order of first use) and
    the latest one (`precision`); a run that encoded nothing changes neither, except on a new index."""
    meta = _get_meta(conn)
    used = list(meta.get("precisions", []))
    if encoded or not used:
        if precision not in used:
            used.append(precision)
        _set_meta(conn, precision=precision, precisions=used)


def _prepare(conn: sqlite3.Connection, run: _Run) -> None:
    """Rank 0, before any encoding: record or check the identity, check (and repair) the embedding store,
    merge shards an interrupted run left, repair what a damaged database lets us (rows without a usable
    embedding are dropped, so their files are encoded again), record the identity of files indexed before it
    was kept, and drop the files gone from the folder."""
    out, identity, db = run.out, run.identity, run.db
    meta = _get_meta(conn, db)
    if not meta:
        if conn.execute("SELECT EXISTS (SELECT 1 FROM segments) OR EXISTS (SELECT 1 FROM files)").fetchone()[
            0
        ]:
            raise VideoIndexError(
                f"{db}: the index record (meta table) is gone but embeddings remain, of unknown origin; {_REBUILD}"
            )
        with _transaction(conn):
            _set_meta(conn, **identity, generation=0, store=create_store(out, "", identity["dim"]))
        meta = _get_meta(conn, db)
    _check_meta(meta, db)
    _check_identity(meta, identity, out)
    remove_unrecorded(out, meta.get("ann"))  # what a killed run left: unrecorded files, temporary files
    for stale in out.glob("embeddings-*.f32"):
        if stale.name != meta["store"]["file"]:
            stale.unlink(missing_ok=True)
    store = repair_store(out, conn, VectorStore(out, meta["store"]))
    _merge_shards(
        conn, out, store
    )  # files an interrupted sharded run committed; its failures are retried below
    _drop_damaged_rows(conn, db, store)
    disk = {e.relpath: e for e in run.videos()}
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
    run.report.removed = len(gone)


def _drop_damaged_rows(conn: sqlite3.Connection, db: Path, store: VectorStore) -> None:
    """Files whose rows cannot be used (a segment pointing outside the store, or no segment at all) and
    segments of no file (a dropped or damaged `files` table) are dropped: their videos are encoded again."""
    damaged = [
        r[0]
        for r in conn.execute(
            "SELECT path FROM files WHERE id IN (SELECT file_id FROM segments WHERE slot < 0 OR slot >= ?) "
            "OR NOT EXISTS (SELECT 1 FROM segments WHERE file_id = files.id)",  # per file, through the index
            (store.rows,),
        )
    ]
    orphans = conn.execute(
        "SELECT COUNT(*) FROM segments WHERE file_id NOT IN (SELECT id FROM files)"
    ).fetchone()[0]
    if damaged or orphans:
        log.warning(
            "%s: %d file(s) with damaged rows and %d segment(s) of no file: dropped, their videos are encoded again",
            db,
            len(damaged),
            orphans,
        )
        with _transaction(conn):
            mark_repair(conn, f"{len(damaged)} file(s) with damaged rows")
            for relpath in damaged:
                _delete_file(conn, relpath)
            _delete_orphans(conn)
            # a damaged slot outside the store is no store row: recorded dead, it would mark the row a
            # re-encoded file is appended to as deleted (and the live-row count wrong on every open)
            conn.execute("DELETE FROM dead WHERE slot < 0 OR slot >= ?", (store.rows,))
            _bump_generation(conn)
    live = _live_count(conn, store.rows)
    if conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0] != live:
        reconcile_dead(conn, store)  # store rows no segment points at any more (a dropped table, a bad slot)


def _changed(entry: _FileEntry, row: tuple | None) -> bool:
    """A file to (re-)encode: new, or its size, mtime or identity differ from the indexed row's."""
    if row is None:
        return True
    size, mtime_ns, device, inode = row
    if (size, mtime_ns) != (entry.size, entry.mtime_ns):
        return True
    return inode is not None and (device, inode) != (entry.device, entry.inode)


def _encode_files(
    conn: sqlite3.Connection, store: VectorStore, run: _Run, entries: list[_FileEntry]
) -> tuple[int, list[tuple[str, str]]]:
    """Encode `entries` into `conn`; returns (files committed, [(relpath, error)] of unreadable ones).

    Decoding runs ahead in `budget.decode_workers` processes (`stanvid.video.pipeline`), the model encodes
    model-sized batches as soon as they are decoded, and finished files are committed every `batch_size` clips.
    """
    cfg, options, budget = run.runner.model.config, run.options, run.budget
    loader_set = _ClipLoader(
        run.root,
        entries,
        clip_len=cfg.num_frames,
        image_size=cfg.clip.vision.image_size,
        segment_seconds=options.segment_seconds,
        chunk=options.batch_size,
        decoder_threads=0,
        moment_step=None if options.moments is False else moment_step(cfg.num_frames, options.moment_window),
        fit=cfg.clip.preprocess.fit,
    )
    workers = min(budget.decode_workers, len(entries))
    # chunks come whole from the dataset (batch_size None), one pass, decoder threads set per worker
    loader = build_loader(
        loader_set,
        None,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=PREFETCH_PER_WORKER,
        worker_init_fn=budget.init_worker,
    )
    rows = cfg.num_frames * (cfg.clip.vision.num_patches + 1)  # token rows one clip puts through a matmul
    per_forward = encode_batch_size(rows, run.runner.device, options.batch_size)
    desc = "indexing" if run.world == 1 else f"indexing (rank {run.rank})"
    with (
        tqdm(
            total=len(entries), desc=desc, unit="video", disable=not options.progress, position=run.rank
        ) as bar,
        budget.model_threads_set(),
    ):
        writer = _Writer(conn, store, run.runner, per_forward, options.batch_size, options.on_commit, bar)
        for chunk in loader:
            writer.add(chunk)
        writer.flush()
    return writer.committed, writer.failures
