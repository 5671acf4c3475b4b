"""How an open index follows the index on disk: the snapshot it answers from now, the cheap check for a newer
committed state, and the swap to it.

The check is one SQLite read of the committed state's token (`snapshot.read_token`: the generation and the
vector index record) on a connection of its own, compared with the current snapshot's; the database file's
identity (device, inode) is compared too, so an index folder deleted and built again is followed as well.
When the token differs, the new state is loaded (`snapshot.load_snapshot`, reusing what did not change) off
the request path and swapped in with one assignment: a request acquires the snapshot current when it
starts and keeps it to its end, the next one gets the new one, and a replaced snapshot closes when its
last request is done.

Who checks: `watch(interval)` runs a thread that checks every `interval` seconds and loads in that thread
(`stanvid serve` runs one), so an update is in place before the next request comes. Without a watcher an
index checks on use, at most every `interval` seconds (the `follow` argument of `open_index`), and loads in
a background thread meanwhile answering from the snapshot it has. `refresh()` checks and loads now, in the
calling thread.

A state that cannot be loaded (its vector index file missing or damaged while the current one is good, a
damaged store, a database being rebuilt) is refused: the index keeps answering from its current snapshot,
logs why once per state, and tries that state again after 5 s, then 10, 20, ... up to 5 minutes; a newer
commit is tried at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from stanvid.errors import VideoIndexError
from stanvid.search.index.ann import ApproxSearcher
from stanvid.search.index.maintain import REPAIR_KEY
from stanvid.search.index.snapshot import Snapshot, load_snapshot, read_token
from stanvid.search.index.store import _connect, _db_errors

log = logging.getLogger("stanvid")

FOLLOW_SECONDS = 1.0  # an open index checks for an update at most this often, on use (see `open_index`)
RETRY_SECONDS = (5.0, 300.0)  # a state that could not be loaded is tried again after 5 s, doubling to 5 min
REANCHOR_SECONDS = 30.0  # an unchanged snapshot renews its read transaction this often (`Snapshot.reanchor`)
CLOSE_SECONDS = 2.0  # `close` waits at most this long for a load under way (a server's shutdown stays quick)


def _repair_reason(mark: object) -> str:
    if isinstance(mark, str):  # as the token holds it: JSON text
        with contextlib.suppress(ValueError):
            mark = json.loads(mark)
    return str(mark.get("why", "")) if isinstance(mark, dict) else "the store was damaged"


def describe_move(old: Snapshot, new: Snapshot) -> str:
    """What an open index moved to, for the log: another index (the folder's index built anew or swapped for
    another: a new store id), the same generation with a new vector index (a merge, a retune), or a newer one."""
    if new.store.record.get("store") != old.store.record.get("store"):
        return f"another index now in the folder (generation {new.generation}, built anew or swapped in)"
    if new.generation == old.generation:
        return f"generation {new.generation} and its new vector index"
    return f"generation {new.generation}"


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Follower:
    """The current snapshot of an open index and its moves to newer committed states (module docstring)."""

    def __init__(self, path: Path, db: Path, interval: float | None = FOLLOW_SECONDS) -> None:
        if interval is not None and not (isinstance(interval, (int, float)) and interval >= 0):
            raise VideoIndexError(f"follow must be a number of seconds >= 0 or None, got {interval!r}")
        self.path, self.db, self.interval = path, db, interval
        self._poll_id = _file_id(db)
        self._poll = _connect(db, create=False)
        self._poll_lock = threading.Lock()
        try:
            self._state = load_snapshot(path, db)
        except BaseException:
            self._poll.close()
            raise
        self._swap_lock = threading.Lock()  # the current snapshot: replaced and acquired under it
        self._load_lock = threading.Lock()  # one load at a time
        self._next_check = time.monotonic() + (interval or 0)
        self._failed: tuple[tuple, float, float] | None = None  # (token, next try, delay)
        self._loader: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._repair_seen: str | None = None  # the repair mark last reported (`_repairing`)
        if self._state.meta.get(REPAIR_KEY) is not None:
            log.warning("%s: opened while a repair is under way (%s): until the run ends, files it re-encodes "
                        "are not found", path, _repair_reason(self._state.meta[REPAIR_KEY]))  # fmt: skip

    @property
    def current(self) -> Snapshot:
        return self._state

    def acquire(self) -> Snapshot:
        """The current snapshot, acquired for one request (release it after); checks for an update first
        when no watcher runs and `interval` has passed since the last check."""
        if self.interval is not None and self._watcher is None and time.monotonic() >= self._next_check:
            self._check_on_use()
        with self._swap_lock:
            return self._state.acquire()

    # ------------------------------------------------------------------------------------ the check
    def committed_token(self) -> tuple:
        """The committed state's token: one SQLite read (a new connection first when the database file was
        replaced)."""
        with self._poll_lock, _db_errors(self.db):
            if self._closed:
                raise VideoIndexError(f"{self.path}: the index was closed")
            found = _file_id(self.db)
            if found is not None and found != self._poll_id:
                fresh = _connect(self.db, create=False)
                self._poll.close()
                self._poll, self._poll_id = fresh, found
            return read_token(self._poll)

    def committed_generation(self) -> int:
        value = dict(self.committed_token()).get("generation")
        return int(value) if value is not None else -1

    def live_rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of the committed state now (not of a snapshot): what is not part of a generation."""
        with self._poll_lock, _db_errors(self.db):
            return self._poll.execute(sql, args).fetchall()

    def _wanted(self, token: tuple | None) -> bool:
        """Whether `token` (the committed state's) is to be loaded: newer than the current snapshot's, and
        not refused a moment ago."""
        if token is None or token == self._state.token:
            return False
        failed = self._failed
        return failed is None or failed[0] != token or time.monotonic() >= failed[1]

    def _committed_now(self) -> tuple | None:
        self._next_check = time.monotonic() + (self.interval or 0)
        try:
            return self.committed_token()
        except VideoIndexError as exc:  # the database being replaced, say: keep answering, try again later
            log.debug("%s: cannot check for an update: %s", self.path, exc)
            return None

    def _check_on_use(self) -> None:
        if not self._wanted(self._committed_now()):
            return
        with self._swap_lock:
            if self._closed or (self._loader is not None and self._loader.is_alive()):
                return
            self._loader = threading.Thread(target=self.poll, name="stanvid-index-load", daemon=True)
            self._loader.start()

    def poll(self) -> bool:
        """Check, and load a newer committed state if there is one; a state that cannot be loaded is logged
        and left for later (never raised). Renews an unchanged snapshot's read transaction now and then."""
        with self._load_lock:
            token, state = self._committed_now(), self._state
            if token == state.token:
                if time.monotonic() - state.anchored > REANCHOR_SECONDS and not self._closed:
                    with contextlib.suppress(VideoIndexError, sqlite3.Error):
                        state.reanchor()
                return False
            if not self._wanted(token):  # unreadable now, or refused a moment ago
                return False
            with contextlib.suppress(VideoIndexError):
                return self._load(token)
            return False

    def refresh(self) -> bool:
        """Check and load now (in this thread): True when a newer state was swapped in; a state that cannot
        be loaded raises `VideoIndexError` (the index keeps answering from the snapshot it has)."""
        with self._load_lock:
            token = self.committed_token()
            if token == self._state.token:
                return False
            return self._load(token)

    def _load(self, token: tuple) -> bool:  # under the load lock
        old = self._state
        if dict(token).get(REPAIR_KEY) is not None and old.meta.get(REPAIR_KEY) is None:
            self._repairing(token)  # the repair's intermediate states are emptier: not followed
            return False
        t0 = time.perf_counter()
        try:
            # strict: a good approximate index is not traded for an exact scan of a damaged one's store
            new = load_snapshot(self.path, self.db, old, strict=isinstance(old.searcher, ApproxSearcher))
        except VideoIndexError as exc:
            self._refused(token, exc)
            raise
        if (
            new.meta.get(REPAIR_KEY) is not None and old.meta.get(REPAIR_KEY) is None
        ):  # marked since the check
            new.retire()
            self._repairing(token)
            return False
        seconds = time.perf_counter() - t0
        with self._swap_lock:
            if self._closed:
                new.retire()
                return False
            self._state = new
        old.retire()
        self._failed = None
        log.info("%s: answering from %s (%d files, %d segments; loaded in %.2f s)", self.path,
                 describe_move(old, new), new.files, new.segments, seconds)  # fmt: skip
        return True

    def _repairing(self, token: tuple) -> None:
        """Keep the current snapshot while the committed state is a repair's, saying so once per repair."""
        mark = dict(token).get(REPAIR_KEY)
        self._failed = (token, time.monotonic() + RETRY_SECONDS[0], RETRY_SECONDS[0])
        if mark != self._repair_seen:
            self._repair_seen = mark
            log.warning("%s: a repair is under way (%s); still answering from generation %d until the run "
                        "re-encodes what it dropped", self.path, _repair_reason(mark), self._state.generation)  # fmt: skip

    def _refused(self, token: tuple, exc: Exception) -> None:
        previous = self._failed
        delay = RETRY_SECONDS[0]
        if previous is not None and previous[0] == token:
            delay = min(RETRY_SECONDS[1], 2 * previous[2])
        self._failed = (token, time.monotonic() + delay, delay)
        log.warning("%s: not following the update to generation %s: %s; still answering from generation %d "
                    "(trying again in %.0f s)", self.path, dict(token).get("generation", "?"), exc,
                    self._state.generation, delay)  # fmt: skip

    # ------------------------------------------------------------------------------------ the watcher
    def watch(self, interval: float | None = None) -> None:
        """Check every `interval` seconds (default: the index's) in a thread of its own, loading there."""
        interval = self.interval if interval is None else interval
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise VideoIndexError(
                f"the watch interval must be a positive number of seconds, got {interval!r}"
            )
        with self._swap_lock:
            if self._watcher is not None or self._closed:
                return
            self._watcher = threading.Thread(
                target=self._watch, args=(float(interval),), name="stanvid-index-watch", daemon=True
            )
            self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.poll()
            except Exception:  # a bug must not stop the following silently: say it, keep checking
                log.exception("%s: checking for an update failed", self.path)

    def stop_watching(self) -> None:
        watcher = self._watcher
        if watcher is not None:
            self._stop.set()
            watcher.join()
            self._watcher = None
            self._stop.clear()

    def close(self) -> None:
        """Stop following and close the current snapshot. A load under way (which may be waiting up to
        `store.BUSY_SECONDS` on another process's lock) is not waited for past `CLOSE_SECONDS`: its thread
        is a daemon, and whatever it loads is retired when it sees the index closed."""
        with self._swap_lock:
            self._closed = True
        self._stop.set()
        for thread in (self._watcher, self._loader):
            if thread is not None:
                thread.join(CLOSE_SECONDS)
        self._watcher = None
        if not self._load_lock.acquire(timeout=CLOSE_SECONDS):
            log.warning("%s: closed while an update was still loading (left to finish on its own)", self.path)
            return
        try:
            self._state.retire()
            with self._poll_lock:
                self._poll.close()
        finally:
            self._load_lock.release()
