"""An index assembled from embeddings computed elsewhere (`stanvid index ... --from-embeddings PATH`).

PATH is a file, a folder or a glob of `stanvid embed` outputs: `NAME.npy` (N, D) float32 rows beside
`NAME.json` = {model, model_fingerprint, dim, segment_seconds, root, rows: [{path, start, end, size,
mtime_ns}, ...]}, or `NAME.parquet` with the columns path, start, end, size, mtime_ns, vector and the same header
in its metadata (key `stanvid`). Every file's header is checked before any row is imported: another model
(fingerprint), dimension or segment length is refused naming the file.

Rows are streamed (the JSON row list is parsed one row at a time, the `.npy` memory-mapped, the parquet read
in record batches) and committed a few tens of thousands of segments at a time, a file's rows always in one
commit, so 10M rows are never in memory and a killed import resumes: a file already indexed with the size and
mtime its rows carry is skipped. A row whose file is not in the folder is dropped (the report says how many);
a file whose size or mtime differs from its rows' is imported as the rows describe it, so the next normal run
sees it changed and encodes it again; files of the folder no embedding file holds are left to a normal run.
"""

from __future__ import annotations

import glob
import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.search.index.records import _FileEntry
from stanvid.search.index.store import _commit_files, _connect, _get_meta
from stanvid.search.index.vectors import VectorStore

HEADER_KEYS = ("model", "model_fingerprint", "dim", "segment_seconds", "root")
COMMIT_ROWS = 65_536
_READ = 1 << 20


def embedding_files(spec: str) -> list[Path]:
    """The embedding files PATH names: one file, a folder's (sorted), or a glob's (sorted)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.json")) + sorted(path.glob("*.parquet"))
    elif any(c in spec for c in "*?["):
        found = sorted(
            Path(p) for p in glob.glob(str(path)) if Path(p).suffix in (".json", ".npy", ".parquet")
        )
    elif path.is_file():
        found = [path]
    else:
        raise VideoIndexError(f"{spec}: no such file or folder of embeddings")
    files = sorted({p.with_suffix(".json") if p.suffix == ".npy" else p for p in found})
    files = [p for p in files if p.suffix in (".json", ".parquet")]
    if not files:
        raise VideoIndexError(f"{spec}: no embedding files (.npy + .json, or .parquet) found")
    return files


# ---------------------------------------------------------------------------------------------- JSON, streamed
class _JsonStream:
    """The top-level object of a JSON file read a piece at a time: `header()` collects every key but
    `rows`; `rows()` yields the elements of the `rows` list one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.decoder = json.JSONDecoder()

    def _chars(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            while block := f.read(_READ):
                yield block

    def _walk(self, want_rows: bool) -> Iterator[tuple[str, Any]]:
        """(key, value) of the top level in order; for `rows`, ("row", element) per element when
        `want_rows`, else the rows are skipped."""
        chars, buf, pos = self._chars(), "", 0

        def need(n: int = 1) -> bool:
            nonlocal buf, pos
            while len(buf) - pos < n:
                more = next(chars, None)
                if more is None:
                    return False
                buf, pos = buf[pos:] + more, 0
            return True

        def skip_ws() -> str:
            nonlocal pos
            while need() and buf[pos] in " \t\r\n":
                pos += 1
            return buf[pos] if need() else ""

        def value() -> Any:
            nonlocal buf, pos
            skip_ws()
            while True:
                try:
                    found, end = self.decoder.raw_decode(buf, pos)
                    if end < len(buf) or not need(len(buf) - pos + 1):
                        pos = end
                        return found
                except json.JSONDecodeError:
                    if not need(len(buf) - pos + 1):  # one more block, if there is one
                        raise
                # the value may go on past the buffer (a number cut in two): read on and decode again

        if skip_ws() != "{":
            raise ValueError("not a JSON object")
        pos += 1
        while (c := skip_ws()) != "}":
            if c == ",":
                pos += 1
                continue
            key = value()
            if skip_ws() != ":":
                raise ValueError(f"expected ':' after {key!r}")
            pos += 1
            if key != "rows":
                yield key, value()
                continue
            if skip_ws() != "[":
                raise ValueError("rows is not a list")
            pos += 1
            while (c := skip_ws()) != "]":
                if c == ",":
                    pos += 1
                    continue
                if not c:
                    raise ValueError("the rows list is cut short")
                row = value()
                if want_rows:
                    yield "row", row
            pos += 1

    def header(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, val in self._walk(want_rows=False):
            found[key] = val
            if all(k in found for k in HEADER_KEYS):
                break
        return found

    def rows(self) -> Iterator[Any]:
        for key, val in self._walk(want_rows=True):
            if key == "row":
                yield val


# ---------------------------------------------------------------------------------------------- sources
class _Source:
    """One embedding file: its header, and its rows in batches of (rows [(path, start, end, size, mtime)],
    (n, D) float32)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                self.parquet = pq.ParquetFile(path)
                raw = (self.parquet.schema_arrow.metadata or {}).get(b"stanvid")
                self.header = json.loads(raw) if raw else {}
            else:
                self.header = _JsonStream(path).header()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise VideoIndexError(f"{path}: not a readable embedding file ({exc})") from exc
        except Exception as exc:  # pyarrow's errors
            if type(exc).__module__.startswith("pyarrow"):
                raise VideoIndexError(f"{path}: not a readable embedding file ({exc})") from exc
            raise

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse the file (naming it) unless its header says: this model, dimension and segment length."""
        missing = [k for k in ("model_fingerprint", "dim", "segment_seconds") if k not in self.header]
        if missing:
            raise VideoIndexError(f"{self.path}: the embedding header lacks {', '.join(missing)}")
        if self.header["model_fingerprint"] != identity["model_fingerprint"]:
            raise VideoIndexError(
                f"{self.path}: embedded by another model (fingerprint {str(self.header['model_fingerprint'])[:12]}, "
                f"this one {identity['model_fingerprint'][:12]}); use the same model"
            )
        if self.header["dim"] != identity["dim"]:
            raise VideoIndexError(
                f"{self.path}: vectors of dimension {self.header['dim']}, the model's are {identity['dim']}"
            )
        if self.header["segment_seconds"] != identity["segment_seconds"]:
            raise VideoIndexError(
                f"{self.path}: segments of {self.header['segment_seconds']!r} s, the index's are "
                f"{identity['segment_seconds']!r} s (--segment-seconds)"
            )

    def batches(self, dim: int) -> Iterator[tuple[list[tuple], np.ndarray]]:
        if self.path.suffix == ".parquet":
            yield from self._parquet_batches(dim)
            return
        npy = self.path.parent / str(self.header.get("vectors", self.path.with_suffix(".npy").name))
        vectors = _NpyReader(npy, dim)
        batch: list[tuple] = []
        done = 0
        try:
            for row in _JsonStream(self.path).rows():
                batch.append(_row(row, self.path, done + len(batch)))
                if len(batch) == COMMIT_ROWS:
                    yield batch, vectors.read(done, len(batch))
                    done, batch = done + len(batch), []
        except (ValueError, UnicodeDecodeError) as exc:
            raise VideoIndexError(f"{self.path}: not a readable embedding file ({exc})") from exc
        if batch:
            yield batch, vectors.read(done, len(batch))
        if done + len(batch) != vectors.rows:
            raise VideoIndexError(
                f"{npy}: {vectors.rows} vectors for {done + len(batch)} rows in {self.path.name}"
            )

    def _parquet_batches(self, dim: int) -> Iterator[tuple[list[tuple], np.ndarray]]:
        names = set(self.parquet.schema_arrow.names)
        need = {"path", "start", "end", "vector"}
        if not need <= names:
            raise VideoIndexError(f"{self.path}: lacks the column(s) {', '.join(sorted(need - names))}")
        done = 0
        for rb in self.parquet.iter_batches(batch_size=COMMIT_ROWS):
            cols = {n: rb.column(n) for n in rb.schema.names}
            vec = cols["vector"]
            flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if len(flat) != len(rb) * dim:
                raise VideoIndexError(f"{self.path}: vectors are not all of dimension {dim}")
            fields = [
                cols[n].to_pylist() if n in cols else [None] * len(rb)
                for n in ("path", "start", "end", "size", "mtime_ns")
            ]
            rows = [
                _row(
                    dict(zip(("path", "start", "end", "size", "mtime_ns"), r, strict=True)),
                    self.path,
                    done + i,
                )
                for i, r in enumerate(zip(*fields, strict=True))
            ]
            yield rows, flat.reshape(len(rb), dim)
            done += len(rb)


class _NpyReader:
    """Rows of an (N, D) float32 `.npy` read with plain file reads (no memory map: the import's RSS stays what
    it holds, whatever the file's size)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise VideoIndexError(f"{path}: not a readable .npy of vectors ({exc})") from exc
        if len(shape) != 2 or shape[1] != dim or dtype != np.float32 or fortran:
            raise VideoIndexError(f"{path}: holds {dtype} {shape}, not (N, {dim}) float32 in C order")
        self.rows, self.dim = shape[0], dim

    def read(self, start: int, n: int) -> np.ndarray:
        if start + n > self.rows:
            raise VideoIndexError(f"{self.path}: {self.rows} vectors, fewer than the rows of its .json")
        out = np.empty((n, self.dim), np.float32)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dim * 4)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise VideoIndexError(f"{self.path}: the file ends before its {self.rows} rows (truncated)")
        return out


def _row(row: Any, where: Path, i: int) -> tuple[str, float, float, int, int]:
    """(path, start, end, size, mtime_ns) of one row; a malformed row names the file and its index."""
    if not isinstance(row, dict):
        raise VideoIndexError(f"{where}: row {i} is not an object")
    path, start, end = row.get("path"), row.get("start"), row.get("end")
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in Path(path).parts:
        raise VideoIndexError(f"{where}: row {i} has a bad path {path!r} (relative to the folder, inside it)")
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise VideoIndexError(f"{where}: row {i} has a bad {name} {v!r}")
    if not 0 <= start < end:
        raise VideoIndexError(f"{where}: row {i} spans {start}..{end} s")
    size, mtime = row.get("size"), row.get("mtime_ns")
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (size, mtime))
    return path, float(start), float(end), size if ok else -1, mtime if ok else -1  # unknown: changed


# ---------------------------------------------------------------------------------------------- import
def import_embeddings(run: Any, spec: str) -> None:
    """Import the rows of the embedding files `spec` names into the index of `run` (`build._Run`)."""
    from stanvid.search.rerank import keeps_frame_vectors

    if keeps_frame_vectors(run.runner.model):
        raise VideoIndexError("a Mug-STAN index needs per-frame vectors, which embedding files do not hold; "
                              "index the folder without --from-embeddings")  # fmt: skip
    sources = [_Source(p) for p in embedding_files(spec)]
    for source in sources:
        source.check(run.identity)
    disk = {e.relpath: e for e in run.videos()}
    run.report.files_seen = len(disk)
    conn = _connect(run.db)
    try:
        state = _Import(disk, run, VectorStore(run.out, _get_meta(conn)["store"]))
        for source in sources:
            for rows, vectors in source.batches(run.identity["dim"]):
                state.add(conn, source.path, rows, vectors)
        state.flush(conn)
    finally:
        conn.close()
    state.report()


class _Import:
    """The import under way: rows grouped by file, committed a few tens of thousands at a time."""

    def __init__(self, disk: dict[str, _FileEntry], run: Any, store: VectorStore) -> None:
        self.disk, self.run, self.store = disk, run, store
        self.files: list[tuple] = []  # (entry, meta, segments) ready to commit
        self.vectors: list[np.ndarray] = []
        self.current: tuple[str, list, list, Path] | None = None  # path, rows, vectors, source
        self.seen: set[str] = set()  # files imported (or kept) by this run
        self.dropped: dict[str, int] = {}
        self.changed = self.kept = self.imported = 0

    def add(self, conn: sqlite3.Connection, source: Path, rows: list[tuple], vectors: np.ndarray) -> None:
        if not np.isfinite(vectors).all():
            raise VideoIndexError(f"{source}: vectors hold NaN or infinity")
        norms = np.linalg.norm(vectors, axis=1)
        if len(norms) and np.abs(norms - 1).max() > 1e-2:
            raise VideoIndexError(
                f"{source}: vectors are not L2-normalized (norm {norms[np.abs(norms - 1).argmax()]:.3f})"
            )
        for i, row in enumerate(rows):
            if self.current is None or self.current[0] != row[0] or self.current[3] != source:
                self._close(conn)
                self.current = (row[0], [], [], source)
            self.current[1].append(row)
            self.current[2].append(vectors[i])

    def _close(self, conn: sqlite3.Connection) -> None:
        if self.current is None:
            return
        path, rows, vectors, source = self.current
        self.current = None
        if path in self.seen:
            raise VideoIndexError(
                f"{source}: the rows of {path} are not contiguous, or another embedding file has them too"
            )
        self.seen.add(path)
        entry = self.disk.get(path)
        if entry is None:
            self.dropped[path] = len(rows)
            return
        size, mtime = rows[0][3], rows[0][4]
        known = conn.execute("SELECT size, mtime_ns FROM files WHERE path = ?", (path,)).fetchone()
        if known is not None and tuple(known) == (size, mtime):
            self.kept += 1  # committed by an earlier (perhaps interrupted) import: nothing to do
            return
        same = (size, mtime) == (entry.size, entry.mtime_ns)
        self.changed += not same
        recorded = _FileEntry(
            path, size, mtime, entry.device if same else None, entry.inode if same else None
        )
        meta = {"duration": max(r[2] for r in rows), "fps": 0.0, "num_frames": 0, "width": 0, "height": 0}
        self.files.append((recorded, meta, [(r[1], r[2]) for r in rows]))
        self.vectors.append(np.stack(vectors))
        if sum(len(v) for v in self.vectors) >= COMMIT_ROWS:
            self.flush(conn, final=False)

    def flush(self, conn: sqlite3.Connection, final: bool = True) -> None:
        if final:
            self._close(conn)
        if self.files:
            vectors = np.concatenate(self.vectors).astype(np.float32, copy=False)
            _commit_files(conn, self.store, self.files, vectors)
            self.imported += len(vectors)
            self.run.report.indexed += len(self.files)
            if self.run.options.on_commit is not None:
                self.run.options.on_commit(self.run.report.indexed)
        self.files, self.vectors = [], []

    def report(self) -> None:
        report = self.run.report
        report.imported = self.imported
        report.unchanged = self.kept
        if self.dropped:
            first = sorted(self.dropped)[:3]
            report.notes.append(
                f"dropped {sum(self.dropped.values())} rows of {len(self.dropped)} file(s) not in the folder "
                f"({', '.join(first)}{', ...' if len(self.dropped) > 3 else ''})"
            )
        if self.changed:
            report.notes.append(f"{self.changed} file(s) changed since they were embedded: the next `stanvid index` "
                                f"encodes them again")  # fmt: skip
        missing = len(self.disk.keys() - self.seen)
        if missing:
            report.notes.append(f"{missing} file(s) of the folder are in no embedding file: `stanvid index` without "
                                f"--from-embeddings encodes them")  # fmt: skip
