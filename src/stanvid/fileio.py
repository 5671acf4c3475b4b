"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every writer goes the same way: a temporary file in the target's folder (so the rename stays on one
filesystem), flushed and fsynced, ``os.replace``d over the target, then the folder fsynced where the platform
allows it (so the rename itself survives a power cut). On any failure, an interrupt included, the temporary
file is removed and the old content is left as it was.

`atomic_write_bytes`, `atomic_write_text` and `atomic_save` write what they are given; `atomic_write_stream`
hands the open temporary file to a callback (a download streamed to disk); `atomic_path` hands out the
temporary file's path, for a writer that opens the file itself (an encoder, a library that takes a file name).
All of them go through the same steps below, so every writer in stanvid gets the same guarantee.

`settled_identity` is the other side: what identifies a file's content without reading it, for the caches
that skip hashing a file already hashed (a model's fingerprint, a vector index file's SHA-256); `sha256_file`
is that hash, read in blocks.

`open_regular` and `read_regular_text` are the reading side for files stanvid did not write: only a regular
file is opened (a FIFO or a device named like a data file would block or never end), and a read is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save",
    "atomic_write_stream",
    "atomic_path",
    "settled_identity",
    "SETTLE_SECONDS",
    "NotRegularFileError",
    "open_regular",
    "read_regular_text",
]

# A change within one tick of a file system's clock (a few ms on ext4, 2 s on FAT) can leave a file's mtime
# and ctime as they were: an identity is only trusted when the file last changed longer ago than this.
SETTLE_SECONDS = 2.0


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded as ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch  # here, not at the top: every command imports this module, not all of them need torch

    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` with a binary file open for writing, and make what it wrote ``path`` atomically: for
    content produced piece by piece (a download of hundreds of MB), never held in memory whole."""
    _atomic_write(Path(path), write)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, temp_name: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; made ``path`` atomically when the block ends.

    For writers that open the file by name themselves (PyAV's muxer). When the block raises, the temporary
    file is removed and ``path`` is left as it was. ``temp_name`` names the temporary file (in ``path``'s
    folder), for a caller that must recognise its leftovers after a process was killed (no clean-up runs
    then); by default it is ``.<name>.tmp-<pid>-<thread>``.
    """
    path = Path(path)
    if temp_name is not None and Path(temp_name).name != temp_name:
        raise ValueError(f"temp_name must be a file name in {path.parent}, got {temp_name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name) if temp_name is not None else _temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def publish_folder(staged: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a folder written in full beside ``path`` into place as ``path`` in one rename (``path`` must not
    exist, or be an empty folder): readers see all of it or none of it."""
    os.replace(staged, path)
    _fsync_dir(Path(path).parent)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content (hex), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def settled_identity(st: os.stat_result, now_ns: int | None = None) -> list[int] | None:
    """[device, inode, size, mtime_ns, ctime_ns] of a file's `os.stat` result, or None while the file changed
    less than `SETTLE_SECONDS` before `now_ns` (default: now).

    While the five are what a recorded identity says, the file holds the bytes it held when it was recorded:
    any write, truncation or replacement moves its ctime (which no program can set back) or its inode. The one
    exception is a second change within the clock tick of the one before, which the settling time rules out:
    a file recorded settled has not changed since a time its next change cannot share. Bit rot on the medium
    itself is not a change any identity sees; reading the bytes is the only check for that.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLE_SECONDS * 1e9:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class NotRegularFileError(OSError):
    """A path that names a FIFO, a socket, a device or a folder where a regular file is read."""


def open_regular(path: str | os.PathLike, mode: str = "rb") -> IO[Any]:
    """``open(path, mode)`` for reading, refusing (`NotRegularFileError`) anything but a regular file.

    The file is opened non-blocking first and checked on the open descriptor, so a FIFO swapped in after a
    check cannot block the open itself; reads then block as usual."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            what = (
                "a folder"
                if stat.S_ISDIR(kind)
                else "a FIFO"
                if stat.S_ISFIFO(kind)
                else "not a regular file"
            )
            raise NotRegularFileError(f"{path}: {what}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(fd, mode, closefd=True)  # noqa: SIM115 (the caller closes it)
    except BaseException:
        os.close(fd)
        raise


def read_regular_text(path: str | os.PathLike, limit: int, encoding: str = "utf-8") -> str:
    """The text of a regular file (`open_regular`) of at most ``limit`` bytes; a larger one is a ValueError
    (read no further than the limit)."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit:,} bytes")
    return data.decode(encoding)


def _temp_path(path: Path) -> Path:
    # pid and thread: two writers of one file never share a temporary file
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError), _open_dir(folder) as fd:
        os.fsync(fd)


@contextlib.contextmanager
def _open_dir(folder: Path) -> Iterator[int]:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield fd
    finally:
        os.close(fd)
