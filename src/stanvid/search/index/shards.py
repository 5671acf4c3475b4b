"""A sharded build under `torchrun`: the gloo group its barriers use, the barrier that shares a failure with
every rank, and the merge of the per-rank shard files into the main index."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from stanvid.distributed import launch_world_size, leave_process_group, rank_world
from stanvid.errors import VideoIndexError
from stanvid.search.index.moment_store import read_moment_row
from stanvid.search.index.records import _FileEntry
from stanvid.search.index.store import SHARD_DIR, _commit_files, _connect, _get_meta
from stanvid.search.index.vectors import VectorStore

log = logging.getLogger("stanvid")


def _join_group(timeout: timedelta) -> dict[str, Any] | None:
    """A gloo group for the barriers of a sharded run (CPU-only collectives, whatever the encoding device).

    Under torchrun (`WORLD_SIZE` > 1 in the environment, no process group yet) the default group is started
    here, as gloo, and left again by `_leave_group`; a process group the caller started is used as it is.
    None for a run of one process.
    """
    if launch_world_size() <= 1:
        return None
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=timeout)
    pg = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    return {"owned": owned, "group": pg}


def _leave_group(group: dict[str, Any] | None, clean: bool = False) -> None:
    """Destroy the default group if `_join_group` started it (after a barrier when the run ended cleanly:
    `stanvid.distributed.leave_process_group`)."""
    if group is not None and group.get("owned"):
        leave_process_group(clean)


def _barrier(group: dict[str, Any] | None, failure: Exception | None) -> None:
    """Wait for every rank, and share failures: when any rank failed, every rank raises (its own exception,
    or a `VideoIndexError` naming the rank that failed), so no rank waits forever for one that gave up."""
    if group is not None:
        messages: list[str | None] = [None] * rank_world()[1]
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        dist.all_gather_object(messages, mine, group=group["group"])
        if failure is None:
            failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
            if failed:
                raise VideoIndexError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if failure is not None:
        raise failure


def _merge_shards(
    conn: sqlite3.Connection, out: Path, store: VectorStore
) -> tuple[int, list[tuple[str, str]]]:
    """Copy every shard's files, segments and vectors into the main index (by path, so merging twice is
    harmless), a few thousand segments per commit, then delete the shard. A shard whose store is damaged is
    dropped (its files are encoded again). Returns (files merged, failures the shards list)."""
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
            source = VectorStore(shard_dir, meta["store"]) if "store" in meta else None
            problem = "has no embedding store" if source is None else source.problem()
            if problem:
                log.warning(
                    "%s %s; the files of %s are encoded again",
                    source.path if source else shard,
                    problem,
                    shard,
                )
            else:
                merged += _copy_shard(conn, src, source, store)
            failed += src.execute("SELECT path, error FROM failures").fetchall()
        stores = [source.path] if source is not None and source.path.parent == shard_dir else []
        for path in [shard, *stores, *shard_dir.glob(f"{shard.stem}.embeddings-*.f32")]:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shard_dir.rmdir()
    return merged, sorted(failed)


def _copy_shard(
    conn: sqlite3.Connection, src: sqlite3.Connection, source: VectorStore, store: VectorStore
) -> int:
    files = src.execute(
        "SELECT id, path, size, mtime_ns, device, inode, duration, fps, num_frames, width, height, created, "
        "title, tags FROM files"
    ).fetchall()
    batch: list[tuple] = []
    slots: list[int] = []
    for fid, path, size, mtime_ns, device, inode, *rest in files:
        segs = src.execute(
            "SELECT s.start, s.end, s.slot, f.frames FROM segments s "
            "LEFT JOIN segment_frames f ON f.segment_id = s.id WHERE s.file_id = ? ORDER BY s.id",
            (fid,),
        ).fetchall()
        names = ("duration", "fps", "num_frames", "width", "height", "created", "title", "tags")
        meta_row = dict(zip(names, rest, strict=True))
        meta_row["moments"] = read_moment_row(src, fid)
        batch.append(
            (_FileEntry(path, size, mtime_ns, device, inode), meta_row, [(a, b, f) for a, b, _, f in segs])
        )
        slots += [slot for _, _, slot, _ in segs]
        if len(slots) >= 4096:
            _commit_files(conn, store, batch, source.read(np.array(slots, np.int64)))
            batch, slots = [], []
    if batch:
        _commit_files(conn, store, batch, source.read(np.array(slots, np.int64)))
    return len(files)
