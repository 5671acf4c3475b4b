"""Embeddings out: every video (or segment) of a folder as rows of (path, start, end, vector), for users who
bring their own vector store.

`embed_videos` is `stanvid.search.index.build_index` plus an export: the embeddings are computed, committed and
resumed by the index's own machinery (the same file walk, decoding, sampling and encoding; a few files per
transaction; re-runs encode only new or changed files and drop deleted ones) into a working index beside the
output (`OUT.index/`, which `stanvid search` can also query), and the rows are then written to `OUT` in one
atomic step. Output formats, chosen by the suffix of `OUT`:

* `.npy` — the `(N, D)` float32 matrix of L2-normalized vectors, and beside it `OUT` with suffix `.json`:
  `{"vectors", "model", "model_fingerprint", "dim", "segment_seconds", "root", "rows": [{"path", "start", "end",
  "size", "mtime_ns", "segment_id"}, ...]}`, row `i` describing vector `i`. Paths are relative to `root`;
  `size` and `mtime_ns` are the file's identity when it was embedded (`stanvid index --from-embeddings`
  re-encodes on its next normal run a file that no longer matches them).
* `.parquet` — one table with columns `path`, `start`, `end`, `size`, `mtime_ns`, `segment_id`, `vector` (list
  of float32) and the header in its metadata (key `stanvid`); needs pyarrow (`pip install 'stanvid[parquet]'`).

Both are written a batch of rows at a time (the `.npy` through a memory map, the JSON row by row), so an
export of 10M rows never holds them in memory.

Across machines: `shard=(i, n)` (`stanvid embed --shard I/N`) embeds the files of share i of n (a stable hash
of their path) into `STEM-0000i-of-0000n.SUFFIX`; under `torchrun` each rank does so for its own rank and
world size, alone (no process group). `stanvid index --from-embeddings FOLDER` then assembles the shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.distributed import launch_env, launch_world_size
from stanvid.errors import EmbedError
from stanvid.fileio import atomic_path, atomic_write_stream
from stanvid.search.index import IndexReport, build_index, open_index

__all__ = [
    "EMBED_FORMATS",
    "EmbedError",
    "EmbedResult",
    "embed_videos",
    "export_embeddings",
    "shard_path",
    "work_index_path",
]

EMBED_FORMATS = (".npy", ".parquet")


@dataclass
class EmbedResult:
    out: Path
    rows: int
    dim: int
    report: IndexReport

    def summary(self) -> str:
        return f"{self.report.summary()}\nwrote {self.rows} rows of dimension {self.dim} to {self.out}"


def work_index_path(out: str | os.PathLike) -> Path:
    """Where `embed_videos` keeps its resumable working index for `out`."""
    out = Path(out)
    return out.with_name(out.name + ".index")


def _check_out(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in EMBED_FORMATS:
        raise EmbedError(f"{out}: the output must end in {' or '.join(EMBED_FORMATS)}")
    if not out.parent.is_dir():
        raise EmbedError(f"{out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise EmbedError(f"{out}: is a folder")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise EmbedError(
                f"{out}: writing parquet needs pyarrow (pip install 'stanvid[parquet]'); or write .npy + .json"
            ) from None
    return suffix


def shard_path(out: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """Where share i of n of `out` is written: `STEM-0000i-of-0000n.SUFFIX`."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{shard[0]:05d}-of-{shard[1]:05d}{out.suffix}")


def embed_videos(
    video_dir: str | os.PathLike,
    out: str | os.PathLike,
    model: Any,
    *,
    shard: tuple[int, int] | None = None,
    **index_args: Any,
) -> EmbedResult:
    """Embed the videos under `video_dir` and write them to `out` (`.npy` + `.json`, or `.parquet`).

    `model` and `index_args` (`segment_seconds`, `batch_size`, `num_workers`, `device`, `model_overrides`,
    `progress`, ...) are those of `stanvid.search.index.build_index`. `shard=(i, n)`, or torchrun's
    RANK / WORLD_SIZE, embeds share i of the files into `shard_path(out, (i, n))`."""
    out = Path(out).expanduser().resolve()
    _check_out(out)
    if shard is None and launch_world_size() > 1:
        shard = (launch_env("RANK", 0), launch_world_size())
    if shard is not None:
        out = shard_path(out, shard)
    report = build_index(video_dir, work_index_path(out), model, shard=shard, **index_args)
    return EmbedResult(out, *export_embeddings(work_index_path(out), out), report)


def export_embeddings(index_path: str | os.PathLike, out: str | os.PathLike) -> tuple[int, int]:
    """Write every segment of an index to `out`, a batch at a time; returns (rows, dim)."""
    out = Path(out).expanduser().resolve()
    suffix = _check_out(out)
    with open_index(index_path) as index:
        meta, count = index.meta, len(index)
        header = {
            "vectors": out.name,
            "model": meta["model_source"],
            "model_fingerprint": meta["model_fingerprint"],
            "dim": meta["dim"],
            "segment_seconds": meta["segment_seconds"],
            "root": meta["root"],
        }
        if suffix == ".parquet":
            _write_parquet(out, index.iter_segments(), header)
        else:
            _write_npy(out, index.iter_segments(), header, count)
    return count, int(meta["dim"])


def _row(s: Any) -> dict[str, Any]:
    return {"path": s.relpath, "start": s.start, "end": s.end, "size": s.size, "mtime_ns": s.mtime_ns,
            "segment_id": s.id}  # fmt: skip


def _write_npy(out: Path, batches: Any, header: dict[str, Any], count: int) -> None:
    """The vectors through a memory map of the temporary `.npy`, the rows streamed into the `.json`."""
    rows_file = out.with_suffix(".json")
    done = 0
    with atomic_path(out) as tmp:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, header["dim"]))
        with atomic_path(rows_file) as tmp_rows, open(tmp_rows, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, indent=1)[:-2] + ',\n "rows": [')
            for segments, vectors in batches:
                if done + len(segments) > count:
                    raise EmbedError(f"{out}: the index changed while it was exported; run again")
                matrix[done : done + len(segments)] = vectors
                for s in segments:
                    f.write(("\n  " if done == 0 else ",\n  ") + json.dumps(_row(s)))
                    done += 1
            f.write("\n ]\n}\n")
        matrix.flush()
        del matrix


def _write_parquet(out: Path, batches: Any, header: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = header["dim"]
    schema = pa.schema(
        [("path", pa.string()), ("start", pa.float64()), ("end", pa.float64()), ("size", pa.int64()),
         ("mtime_ns", pa.int64()), ("segment_id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))],
        metadata={"stanvid": json.dumps(header)},
    )  # fmt: skip

    def write(f: Any) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for segments, vectors in batches:
                rows = [_row(s) for s in segments]
                columns = {
                    k: [r[k] for r in rows]
                    for k in ("path", "start", "end", "size", "mtime_ns", "segment_id")
                }
                flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
                columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
                writer.write_table(pa.table(columns, schema=schema))

    atomic_write_stream(out, write)
