"""An exclusive lock on a folder for long jobs that must not run twice at once (two `stanvid index` runs on one
index would both re-encode everything).

The lock is an advisory `flock` on a small file that also records who holds it (process id, host, start time),
so a refused run can say which process to wait for. The kernel drops a `flock` when its process dies, however
it dies, so the lock file a killed run leaves behind is not a held lock: the next run takes it over and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from stanvid.errors import LockHeldError, StanvidError

try:  # POSIX; elsewhere the lock degrades to recording the holder (no exclusion)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LockHeldError", "exclusive_lock", "processes_using"]

log = logging.getLogger("stanvid")


def processes_using(path: str | os.PathLike, limit: int = 5) -> list[str]:
    """Other processes that have ``path`` (or its SQLite ``-wal`` / ``-shm`` files) open, as "PID (command
    line)": what a message about a locked file names. Read from ``/proc`` (Linux); elsewhere, or where
    ``/proc`` hides other users' processes, an empty list."""
    real = os.path.realpath(path)
    wanted = {real, real + "-wal", real + "-shm", real + "-journal"}
    found: list[str] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = " ".join(f.read(400).replace(b"\0", b" ").decode("utf-8", "replace").split())
                found.append(f"{pid} ({command[:120] or '?'})")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if len(found) >= limit:
            break
    return found


def _describe(holder: dict) -> str:
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    )
    return f"process {pid} on {host} (since {when})"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) for the duration of the block.

    Raises `LockHeldError` naming the holder when another live process has it; a lock file left by a dead
    process is taken over with a warning. `what` names the locked thing in messages ("index /data/idx").
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StanvidError(f"{path}: cannot create the lock file for {what} ({exc.strerror})") from exc
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeldError(
                    f"{what} is in use by {_describe(_read_holder(fd))} (lock file {path}); wait for it to "
                    f"finish or stop it, then re-run"
                ) from None
        previous = _read_holder(fd)  # read once ours: what a holder that died without releasing left
        if previous.get("pid") is not None:
            log.warning(
                "%s: taking over a stale lock left by %s, which is no longer running",
                what,
                _describe(previous),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty file is no one's lock
    finally:
        os.close(fd)  # drops the flock
