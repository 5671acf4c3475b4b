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
import io
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.errors import VideoIndexError
from stanvid.fileio import open_regular
from stanvid.search.index.identity import describe_segments
from stanvid.search.index.records import _FileEntry
from stanvid.search.index.store import _commit_files, _connect, _get_meta
from stanvid.search.index.vectors import VectorStore

HEADER_KEYS = ("model", "model_fingerprint", "dim", "segment_seconds", "root", "vectors")
COMMIT_ROWS = 65_536
MAX_VALUE_CHARS = 16 << 20  # one header value or row; a longer one is damage, not an embedding file
_READ = 1 << 20
_CUT = 16  # the longest token a block boundary can cut yet leave decodable (-Infinity, two escapes)
_INT64 = 1 << 63
_SPACE = re.compile(r"[ \t\r\n]*")


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
    for p in files:
        if p.exists() and not p.is_file():  # a FIFO named like one would block the import
            raise VideoIndexError(f"{p}: not a regular file (a FIFO, device or folder); remove it or name the "
                                  f"embedding files one by one")  # fmt: skip
    return files


# ---------------------------------------------------------------------------------------------- JSON, streamed
class _Chars:
    """A text file read a block at a time: ``buf[pos:]`` is what is not consumed yet, ``base`` the characters
    of the file before ``buf`` (so an error names its place in the file, not in the buffer)."""

    def __init__(self, text: io.TextIOBase) -> None:
        self.text, self.buf, self.pos, self.base = text, "", 0, 0

    def more(self) -> bool:
        """Append one more block (False at the end of the file); one value may not outgrow `MAX_VALUE_CHARS`."""
        if len(self.buf) - self.pos > MAX_VALUE_CHARS:
            raise ValueError(f"a value longer than {MAX_VALUE_CHARS:,} characters at {self.at()}")
        block = self.text.read(_READ)
        if not block:
            return False
        self.base += self.pos
        self.buf, self.pos = self.buf[self.pos :] + block, 0
        return True

    def at(self, pos: int | None = None) -> str:
        return f"character {self.base + (self.pos if pos is None else pos)}"

    def peek(self) -> str:
        """The next character after white space ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def value(self, decoder: json.JSONDecoder) -> Any:
        """The next JSON value. A decode error near the buffer's end (a value cut by a block boundary) reads on;
        any other is raised at once, naming its place in the file."""
        self.peek()
        while True:
            try:
                found, end = decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise ValueError(f"nested too deeply at {self.at()}") from None
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.buf) - _CUT or exc.msg.startswith("Unterminated string")
                if cut and self.more():
                    continue
                raise ValueError(f"{exc.msg} at {self.at(exc.pos)}") from None
            if end + _CUT < len(self.buf) or not self.more():  # a number or literal may go on past the buffer
                self.pos = end
                return found


class _JsonStream:
    """The top-level object of a JSON file read a piece at a time: `header()` collects every key but
    `rows`; `rows()` yields the elements of the `rows` list one at a time. The file must be a regular file
    (a FIFO would block); an error is raised at the first character that cannot be JSON, the file read no
    further than that (plus one block)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.decoder = json.JSONDecoder()

    def _walk(self, want_rows: bool) -> Iterator[tuple[str, Any]]:
        """(key, value) of the top level in order; for `rows`, ("row", element) per element when
        `want_rows`, else the rows are skipped."""
        with open_regular(self.path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
            yield from self._parse(_Chars(text), want_rows)

    def _parse(self, chars: _Chars, want_rows: bool) -> Iterator[tuple[str, Any]]:
        def expect(c: str, what: str) -> None:
            if chars.peek() != c:
                raise ValueError(f"{what} at {chars.at()}")
            chars.pos += 1

        expect("{", "not a JSON object")
        while (c := chars.peek()) != "}":
            if c == ",":
                chars.pos += 1
                continue
            if not c:
                raise ValueError(f"the object is cut short at {chars.at()}")
            if c != '"':
                raise ValueError(f"expected a key (a string) at {chars.at()}")
            key = chars.value(self.decoder)
            expect(":", f"expected ':' after {str(key)[:40]!r}")
            if key != "rows":
                yield key, chars.value(self.decoder)
                if chars.peek() not in (",", "}"):
                    raise ValueError(
                        f"expected ',' or '}}' after the value of {str(key)[:40]!r} at {chars.at()}"
                    )
                continue
            expect("[", "rows is not a list")
            while (c := chars.peek()) != "]":
                if c == ",":
                    chars.pos += 1
                    continue
                if not c:
                    raise ValueError(f"the rows list is cut short at {chars.at()}")
                row = chars.value(self.decoder)
                if chars.peek() not in (",", "]"):
                    raise ValueError(f"expected ',' or ']' after a row at {chars.at()}")
                if want_rows:
                    yield "row", row
            chars.pos += 1

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

                self.parquet = pq.ParquetFile(open_regular(path))
                raw = (self.parquet.schema_arrow.metadata or {}).get(b"stanvid")
                self.header = json.loads(raw) if raw else {}
            else:
                self.header = _JsonStream(path).header()
        except RecursionError:
            raise VideoIndexError(
                f"{path}: not a readable embedding file (its header is nested too deeply)"
            ) from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise VideoIndexError(f"{path}: not a readable embedding file ({exc})") from exc
        except Exception as exc:  # pyarrow's errors
            if type(exc).__module__.startswith("pyarrow"):
                raise VideoIndexError(f"{path}: not a readable embedding file ({exc})") from exc
            raise
        if not isinstance(self.header, dict):
            raise VideoIndexError(f"{path}: the embedding header is not an object")

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse the file (naming it) unless its header says: this model, dimension and segment length, and
        (JSON) names its vectors as a regular file beside it."""
        missing = [k for k in ("model_fingerprint", "dim", "segment_seconds") if k not in self.header]
        if missing:
            raise VideoIndexError(f"{self.path}: the embedding header lacks {', '.join(missing)}")
        if self.header["model_fingerprint"] != identity["model_fingerprint"]:
            raise VideoIndexError(
                f"{self.path}: embedded by another model (fingerprint {str(self.header['model_fingerprint'])[:12]}, "
                f"this one {identity['model_fingerprint'][:12]}); use the same model"
            )
        dim = self.header["dim"]
        if not _is_int(dim) or dim != identity["dim"]:
            what = f"vectors of dimension {dim}" if _is_int(dim) else f"a dim of {dim!r}, not a whole number"
            raise VideoIndexError(
                f"{self.path}: {what}; the model's vectors have {identity['dim']} dimensions"
            )
        seconds = segment_length(self.header, self.path)
        if seconds != identity["segment_seconds"]:
            raise VideoIndexError(
                f"{self.path}: {describe_segments(seconds)}, the index's are "
                f"{describe_segments(identity['segment_seconds'])} (--segment-seconds)"
            )
        if self.path.suffix != ".parquet":
            self.npy = self._vectors_file()

    def _vectors_file(self) -> Path:
        """The header's `vectors`: a file name (no folder, no `..`) of a regular file beside the JSON, links
        resolved; anything else is refused before a byte of it is read."""
        name = self.header.get("vectors", self.path.with_suffix(".npy").name)
        if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name or "\\" in name:
            raise VideoIndexError(
                f"{self.path}: the header's vectors {str(name)[:80]!r} must be the name of a file beside it"
            )
        npy = self.path.parent / name
        if npy.resolve().parent != self.path.resolve().parent:
            raise VideoIndexError(f"{self.path}: the header's vectors {name!r} is a link out of its folder")
        if npy.exists() and not npy.is_file():
            raise VideoIndexError(f"{npy}: not a regular file (a FIFO, device or folder)")
        return npy

    def batches(self, dim: int) -> Iterator[tuple[list[tuple], np.ndarray]]:
        if self.path.suffix == ".parquet":
            yield from self._parquet_batches(dim)
            return
        npy = self.npy
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
        import pyarrow as pa

        schema = self.parquet.schema_arrow
        need = {"path", "start", "end", "vector"}
        if not need <= set(schema.names):
            raise VideoIndexError(
                f"{self.path}: lacks the column(s) {', '.join(sorted(need - set(schema.names)))}"
            )
        kind = schema.field("vector").type
        if not (
            (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))
            and pa.types.is_floating(kind.value_type)
        ):
            raise VideoIndexError(f"{self.path}: column vector holds {kind}, not lists of floats")
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
            with open_regular(path) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except OSError as exc:
            raise VideoIndexError(f"{path}: not a readable .npy of vectors ({exc.strerror or exc})") from None
        except ValueError:  # its message quotes the file's first bytes: not repeated
            raise VideoIndexError(f"{path}: not a .npy file (no valid .npy header)") from None
        if len(shape) != 2 or shape[1] != dim or dtype != np.float32 or fortran:
            raise VideoIndexError(f"{path}: holds {dtype} {shape}, not (N, {dim}) float32 in C order")
        self.rows, self.dim = shape[0], dim

    def read(self, start: int, n: int) -> np.ndarray:
        if start + n > self.rows:
            raise VideoIndexError(f"{self.path}: {self.rows} vectors, fewer than the rows of its .json")
        out = np.empty((n, self.dim), np.float32)
        with open_regular(self.path) as f:
            f.seek(self.offset + start * self.dim * 4)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise VideoIndexError(f"{self.path}: the file ends before its {self.rows} rows (truncated)")
        return out


def _row(row: Any, where: Path, i: int) -> tuple[str, float, float, int, int]:
    """(path, start, end, size, mtime_ns) of one row; a malformed row names the file and its index."""
    if not isinstance(row, dict):
        raise VideoIndexError(f"{where}: row {i} is not an object")
    path, start, end = row.get("path"), row.get("start"), row.get("end")
    if not _is_path(path):
        raise VideoIndexError(
            f"{where}: row {i} has a bad path {str(path)[:80]!r} (relative to the folder, inside it)"
        )
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise VideoIndexError(f"{where}: row {i} has a bad {name} {v!r}")
    if not 0 <= start < end:
        raise VideoIndexError(f"{where}: row {i} spans {start}..{end} s")
    size, mtime = row.get("size"), row.get("mtime_ns")
    for name, v in (("size", size), ("mtime_ns", mtime)):
        if _is_int(v) and not 0 <= v < _INT64:
            raise VideoIndexError(f"{where}: row {i} has a bad {name} {v} (not a 64-bit count)")
    ok = _is_int(size) and _is_int(mtime)
    return path, float(start), float(end), size if ok else -1, mtime if ok else -1  # unknown: changed


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_path(path: Any) -> bool:
    """A relative path inside the folder that SQLite can store (UTF-8, no NUL)."""
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or ".." in Path(path).parts
        or "\0" in path
    ):
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, escaped in the JSON
        return False
    return True


def segment_length(header: dict[str, Any], where: Path) -> float | None:
    """The header's `segment_seconds`: None (a row per whole video) or a positive number of seconds."""
    v = header.get("segment_seconds")
    if v is not None and (
        isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0
    ):
        raise VideoIndexError(f"{where}: the header's segment_seconds {v!r} is not a positive number or null")
    return None if v is None else float(v)


def embedded_segment_length(spec: str) -> float | None:
    """The segment length the first embedding file `spec` names was embedded with: what a new index built
    from them takes when no `--segment-seconds` is given (every file is checked against it later)."""
    return segment_length(_Source(embedding_files(spec)[0]).header, Path(spec))


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
        self.changed = self.kept = self.imported = self.repeated = 0

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
        spans: dict[tuple[float, float], int] = {}  # a span given twice is one segment, its first row kept
        for j, r in enumerate(rows):
            spans.setdefault((r[1], r[2]), j)
        if len(spans) < len(rows):
            self.repeated += len(rows) - len(spans)
            rows, vectors = [rows[j] for j in spans.values()], [vectors[j] for j in spans.values()]
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
        if self.repeated:
            report.notes.append(
                f"{self.repeated} repeated row(s) (the same file and span again) imported once"
            )
        if self.changed:
            report.notes.append(f"{self.changed} file(s) changed since they were embedded: the next `stanvid index` "
                                f"encodes them again")  # fmt: skip
        missing = len(self.disk.keys() - self.seen)
        if missing:
            report.notes.append(f"{missing} file(s) of the folder are in no embedding file: `stanvid index` without "
                                f"--from-embeddings encodes them")  # fmt: skip
