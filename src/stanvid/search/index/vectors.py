"""The embedding store: every segment's float32 unit vector in one append-only file the SQLite rows point into.

    embeddings-<epoch>.f32   a 4096-byte header (magic, the index's store id, dim, epoch), then row `slot` of
                             `dim` float32 at byte 4096 + slot * 4 * dim

A segment row holds its `slot`. A run appends the vectors of the files it commits at the end of the committed
rows, fsyncs them, and only then commits the SQLite transaction that inserts the rows pointing at them and
raises the recorded row count (`meta.store.rows`), with the SHA-256 of the appended bytes (`store_chunks`).
So a run killed at any point leaves rows that all point at committed, durable vectors; whatever it wrote past
the recorded count is ignored by readers and overwritten (then truncated) by the next writer. Readers map the
committed rows (`pread`, no memory map kept): a search reads the few rows it re-ranks, never the whole file.

A deleted segment's slot becomes dead (`dead` table); when the dead rows pass half of the file the next run
writes the live rows into `embeddings-<epoch+1>.f32` and commits the new slots in one transaction (a reader
that mapped the old file keeps it: its inode lives until unmapped).

The header makes a foreign, truncated or garbage file an error before any row is used; a changed byte inside
the rows is found by the chunk hashes when a run reads the rows whole (a retrain, a compaction, a repair).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.fileio import atomic_path

MAGIC = b"STANVEC1"
HEADER_BYTES = 4096
READ_ROWS = 65_536  # rows per chunk when the store is read whole (128 MiB at 512-d)


def store_file_name(prefix: str, epoch: int) -> str:
    return f"{prefix}embeddings-{epoch}.f32"


def _header(store_id: str, dim: int, epoch: int) -> bytes:
    body = json.dumps({"store": store_id, "dim": dim, "epoch": epoch}).encode()
    return (MAGIC + len(body).to_bytes(4, "little") + body).ljust(HEADER_BYTES, b"\0")


def create_store(folder: Path, prefix: str, dim: int, epoch: int = 0, store_id: str | None = None) -> dict:
    """Write an empty store file (atomically) and return its record for `meta.store`."""
    store_id = store_id or uuid.uuid4().hex
    name = store_file_name(prefix, epoch)
    with atomic_path(folder / name) as tmp:
        tmp.write_bytes(_header(store_id, dim, epoch))
    return {"file": name, "store": store_id, "dim": dim, "epoch": epoch, "rows": 0}


class VectorStore:
    """The store of one index database (`record` is its `meta.store`): checked, mapped and appended to."""

    def __init__(self, folder: Path, record: dict[str, Any]) -> None:
        self.folder = folder
        self.record = dict(record)
        self.path = folder / str(record["file"])
        self.dim = int(record["dim"])
        self.rows = int(record["rows"])  # committed rows; slots >= rows are not part of the index
        self.row_bytes = 4 * self.dim
        self._file: int | None = None  # read descriptor, opened on first use

    # ---------------------------------------------------------------- checks
    def problem(self) -> str:
        """What is wrong with the file for this record ("" when it holds the committed rows of this index).
        Once the store is `open`, the file checked is the one opened, whatever the path names since."""
        try:
            if self._file is not None:
                head = os.pread(self._file, HEADER_BYTES, 0)
                size = os.fstat(self._file).st_size
            else:
                with open(self.path, "rb") as f:
                    head = f.read(HEADER_BYTES)
                    size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return "is missing"
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            return "is not an embedding store (damaged)"
        try:
            n = int.from_bytes(head[8:12], "little")
            found = json.loads(head[12 : 12 + n])
        except (ValueError, UnicodeDecodeError):
            return "has a damaged header"
        want = {k: self.record[k] for k in ("store", "dim", "epoch")}
        if not isinstance(found, dict) or {k: found.get(k) for k in want} != want:
            return "belongs to another index (copied from elsewhere?)"
        if size < HEADER_BYTES + self.rows * self.row_bytes:
            return f"holds {(size - HEADER_BYTES) // self.row_bytes} rows, the index {self.rows} (truncated)"
        return ""

    # ---------------------------------------------------------------- reading
    def open(self) -> VectorStore:
        """Open the file for reading now (FileNotFoundError when it is missing): every later read is of this
        file, so a reader keeps its rows after a compaction unlinked it (the inode lives while open)."""
        self._fd()
        return self

    def _size(self) -> int:
        if self._file is not None:
            return os.fstat(self._file).st_size
        return self.path.stat().st_size if self.path.exists() else 0

    def readable_rows(self) -> int:
        """Committed rows the file holds (fewer than `rows` only when it was truncated)."""
        return min(self.rows, max(0, self._size() - HEADER_BYTES) // self.row_bytes)

    def _fd(self) -> int:
        if self._file is None:
            self._file = os.open(self.path, os.O_RDONLY)
        return self._file

    def read(self, slots: np.ndarray) -> np.ndarray:
        """(len(slots), D) float32 copies of the rows `slots`, in that order.

        Read with `pread`, runs of consecutive slots at once, rather than through a memory map: a search reads
        a few hundred rows and the process keeps none of the file's pages, so its RSS stays what it holds."""
        slots = np.asarray(slots, dtype=np.int64)
        out = np.empty((len(slots), self.dim), np.float32)
        if not len(slots):
            return out
        if slots.min() < 0 or slots.max() >= self.rows:
            raise IndexError(f"{self.path}: slot out of range (the store holds {self.rows} rows)")
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        fd, at = self._fd(), 0
        sorted_out = np.empty_like(out)
        for run in np.split(ordered, breaks):
            want = len(run) * self.row_bytes
            data = os.pread(fd, want, HEADER_BYTES + int(run[0]) * self.row_bytes)
            if len(data) != want:
                raise IndexError(f"{self.path}: rows {run[0]}.. are past the end of the file (truncated)")
            sorted_out[at : at + len(run)] = np.frombuffer(data, np.float32).reshape(len(run), self.dim)
            at += len(run)
        out[order] = sorted_out
        return out

    def chunks(self, rows: int = READ_ROWS, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(first slot, (n, D) float32) over the readable committed rows from `start`, `rows` at a time, read
        sequentially (the page cache holds them, not this process)."""
        end = self.readable_rows()
        for first in range(start, end, rows):
            n = min(rows, end - first)
            block = np.empty((n, self.dim), np.float32)
            if os.preadv(
                self._fd(), [memoryview(block).cast("B")], HEADER_BYTES + first * self.row_bytes
            ) != (n * self.row_bytes):
                raise IndexError(f"{self.path}: rows {first}.. are past the end of the file (truncated)")
            yield first, block

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def __del__(self) -> None:
        self.close()

    def bad_chunks(self, recorded: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
        """(first, rows) of the recorded chunks whose bytes no longer hash as committed (reads them all)."""
        size = self._size()
        bad = []
        for first, count, digest in recorded:
            end = HEADER_BYTES + (first + count) * self.row_bytes
            if end > size or _sha256_at(self._fd(), HEADER_BYTES + first * self.row_bytes,
                                        count * self.row_bytes) != digest:  # fmt: skip
                bad.append((first, count))
        return bad

    # ---------------------------------------------------------------- writing (under the index lock)
    def append(self, vectors: np.ndarray) -> tuple[int, str]:
        """Write (n, D) vectors after the committed rows and fsync them; returns (first slot, SHA-256 of the
        bytes). Not part of the index until the caller commits `first + n` as the row count (`advance`)."""
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"vectors must be (n, {self.dim}), got {data.shape}")
        raw = data.tobytes()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            offset = HEADER_BYTES + self.rows * self.row_bytes
            view = memoryview(raw)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.rows, hashlib.sha256(raw).hexdigest()

    def advance(self, rows: int) -> None:
        """The transaction recording `rows` committed rows succeeded."""
        self.rows = self.record["rows"] = rows

    def drop_tail(self) -> None:
        """Truncate what a killed run wrote past the committed rows (disk only: readers never map it)."""
        end = HEADER_BYTES + self.rows * self.row_bytes
        if self.path.exists() and self.path.stat().st_size > end:
            os.truncate(self.path, end)


def _sha256_at(fd: int, offset: int, count: int) -> str:
    """SHA-256 of `count` bytes of a file from `offset` ("" when the file ends before them)."""
    digest = hashlib.sha256()
    while count > 0:
        block = os.pread(fd, min(count, 1 << 24), offset)
        if not block:
            break
        digest.update(block)
        count, offset = count - len(block), offset + len(block)
    return digest.hexdigest() if count == 0 else ""
