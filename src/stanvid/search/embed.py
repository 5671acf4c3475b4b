"""Embeddings out: every video (or segment) of a folder as rows of (path, start, end, vector), for users who
bring their own vector store.

`embed_videos` is `stanvid.search.index.build_index` plus an export: the embeddings are computed, committed and
resumed by the index's own machinery (the same file walk, decoding, sampling and encoding; a few files per
transaction; re-runs encode only new or changed files and drop deleted ones) into a working index beside the
output (`OUT.index/`, which `stanvid search` can also query), and the rows are then written to `OUT` in one
atomic step. Output formats, chosen by the suffix of `OUT`:

* `.npy` — the `(N, D)` float32 matrix of L2-normalized vectors, and beside it `OUT` with suffix `.json`:
  `{"model", "model_fingerprint", "dim", "segment_seconds", "root", "rows": [{"path", "start", "end",
  "segment_id"}, ...]}`, row `i` describing vector `i`. Paths are relative to `root`.
* `.parquet` — one table with columns `path`, `start`, `end`, `segment_id`, `vector` (list of float32); needs
  `pyarrow` (not a dependency of stanvid: `pip install pyarrow`).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.errors import EmbedError
from stanvid.fileio import atomic_write_bytes as atomic_write  # the name embed exported before fileio
from stanvid.search.index import IndexReport, build_index, open_index

__all__ = [
    "EMBED_FORMATS",
    "atomic_write",
    "EmbedError",
    "EmbedResult",
    "embed_videos",
    "export_embeddings",
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
                f"{out}: writing parquet needs pyarrow (pip install pyarrow); or write .npy + .json"
            ) from None
    return suffix


def embed_videos(
    video_dir: str | os.PathLike, out: str | os.PathLike, model: Any, **index_args: Any
) -> EmbedResult:
    """Embed the videos under `video_dir` and write them to `out` (`.npy` + `.json`, or `.parquet`).

    `model` and `index_args` (`segment_seconds`, `batch_size`, `num_workers`, `device`, `model_overrides`,
    `progress`, ...) are those of `stanvid.search.index.build_index`."""
    out = Path(out).expanduser().resolve()
    _check_out(out)
    report = build_index(video_dir, work_index_path(out), model, **index_args)
    return EmbedResult(out, *export_embeddings(work_index_path(out), out), report)


def export_embeddings(index_path: str | os.PathLike, out: str | os.PathLike) -> tuple[int, int]:
    """Write every segment of an index to `out`; returns (rows, dim)."""
    out = Path(out).expanduser().resolve()
    suffix = _check_out(out)
    with open_index(index_path) as index:
        segments, vectors = index.all_segments()  # (N,), (N, D)
        meta = index.meta
    rows = [{"path": s.relpath, "start": s.start, "end": s.end, "segment_id": s.id} for s in segments]
    if suffix == ".parquet":
        _write_parquet(out, rows, vectors)
    else:
        buf = io.BytesIO()
        np.save(buf, vectors)
        atomic_write(out, buf.getvalue())
        header = {
            "vectors": out.name,
            "model": meta["model_source"],
            "model_fingerprint": meta["model_fingerprint"],
            "dim": meta["dim"],
            "segment_seconds": meta["segment_seconds"],
            "root": meta["root"],
            "rows": rows,
        }
        atomic_write(out.with_suffix(".json"), json.dumps(header, indent=1).encode())
    return len(rows), int(meta["dim"])


def _write_parquet(out: Path, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    table = pa.table(
        {
            "path": [r["path"] for r in rows],
            "start": np.array([r["start"] for r in rows], np.float64),
            "end": np.array([r["end"] for r in rows], np.float64),
            "segment_id": np.array([r["segment_id"] for r in rows], np.int64),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        }
    )
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write(out, buf.getvalue().to_pybytes())
