"""What the index keeps for moments (`stanvid.search.moments`): per file, its moment samples' per-frame vectors.

Table ``file_moments`` (one row a file, keyed by the file's id): ``step`` (seconds between samples, the first at
``step / 2``), ``count`` and ``dim`` (rows and columns) and ``features``, the ``(count, dim)`` float16 unit
vectors row-major (half the bytes of float32; the cosine of a float16 unit vector with a query differs from the
float32 one by about 1e-3, far below what separates a moment from the rest of a file). The row is inserted in
the transaction that inserts its file's row and deleted with it (`store._insert_file`, `store._delete_file`),
so moments follow every update, deletion, interrupted run and shard merge as the segments do. An index made
before moments were kept has no such table; a file indexed with `--no-moments` (or imported from embeddings)
has no row: both still search, with fixed segments.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stanvid.errors import VideoIndexError

TABLE = "file_moments"

SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (file_id INTEGER PRIMARY KEY, step REAL NOT NULL, "
    "count INTEGER NOT NULL, dim INTEGER NOT NULL, features BLOB NOT NULL);"
)


@dataclass(frozen=True)
class MomentFeatures:
    """A file's moment samples: `step` seconds apart (the first at step / 2), `(n, D)` float16 unit vectors."""

    step: float
    features: np.ndarray  # (n, D)

    def row(self) -> tuple[float, int, int, bytes]:
        n, dim = self.features.shape
        return self.step, n, dim, np.ascontiguousarray(self.features, dtype=np.float16).tobytes()


def normalized_half(per_frame: np.ndarray) -> np.ndarray:
    """(n, D) per-frame vectors -> float16 unit vectors (what the table keeps)."""
    per_frame = np.asarray(per_frame, np.float32)
    return (per_frame / np.maximum(np.linalg.norm(per_frame, axis=1, keepdims=True), 1e-12)).astype(
        np.float16
    )


def write_moments(conn: sqlite3.Connection, file_id: int, moments: MomentFeatures) -> None:
    """Insert (or replace) a file's moment row, inside the caller's transaction."""
    conn.execute(
        f"INSERT OR REPLACE INTO {TABLE} (file_id, step, count, dim, features) VALUES (?, ?, ?, ?, ?)",
        (int(file_id), *moments.row()),
    )


def read_moment_row(conn: sqlite3.Connection, file_id: int) -> MomentFeatures | None:
    """A file's row from a database that has the table (a shard being merged), or None."""
    row = conn.execute(
        f"SELECT step, count, dim, features FROM {TABLE} WHERE file_id = ?", (int(file_id),)
    ).fetchone()
    return None if row is None else MomentFeatures(row[0], decode(row, where=f"file {file_id}"))


def decode(row: Sequence[Any], where: str) -> np.ndarray:
    """(step, count, dim, blob) -> `(count, dim)` float16; a row whose blob does not hold them is reported."""
    step, count, dim, blob = row
    ok = (
        isinstance(blob, bytes)
        and isinstance(count, int)
        and isinstance(dim, int)
        and count > 0
        and dim > 0
        and len(blob) == 2 * count * dim
        and isinstance(step, int | float)
        and step > 0
    )
    if not ok:
        raise VideoIndexError(f"{where}: the stored moment features are damaged; {_REBUILD_HINT}")
    return np.frombuffer(blob, dtype=np.float16).reshape(count, dim)


_REBUILD_HINT = "delete the file's row (re-run `stanvid index` after touching it) or build the index again"


def has_table(rows: Any) -> bool:
    """Whether an index database has the moments table; `rows(sql, args)` runs a query (a snapshot's)."""
    return bool(rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)))
