"""Filters on a search: which files' segments a query may return, applied inside the vector search.

A filter is about files: where they lie (`in`: a glob over the path relative to the indexed folder, or a
folder prefix), when they were last modified (`after`, `before`), how long they are (`min_duration`,
`max_duration`) and, where the container carries them, when they were recorded (`created_after`,
`created_before`) and their title (`title`, a case-insensitive substring). Every field given must hold.

The segments of the files that pass become the allowed rows of the search (`stanvid.search.index.ann.
AllowedRows`): a bitmap over the store's rows handed to FAISS with the query, exactly as deletions are, so
`k` hits come back whenever `k` segments pass, at the recall of an unfiltered search (the probes grow as
the filter narrows, `ann.filter_probe`); a filter keeping few rows is answered by an exact scan of them.

Reading the filterable columns of a generation costs one pass over its `files` and `segments` tables (about
a second at 1M segments), done on the first filtered search of that generation and kept with it, as are the
allowed rows of the last few filters (so the pages of one filtered search cost one computation).

Times: a date (`2024-05-01`), a date and time (`2024-05-01T10:00`, `...Z`, `...+02:00`; without a zone,
UTC), POSIX seconds, or an age (`30d`, `12h`, `2w`: that long before now). Durations: seconds, or with a unit
(`90s`, `1.5m`, `2h`). `before` and `created_before` are exclusive, the others inclusive.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stanvid.errors import QueryError
from stanvid.search.index.ann import AllowedRows
from stanvid.search.index.store import _bump_generation, _transaction

__all__ = ["FILTER_FIELDS", "SearchFilter", "allowed_rows", "check_offset", "filterable", "parse_filters"]

# the fields a filter has, by the names the API and Python take (the CLI spells them --in, --min-duration, ...)
FILTER_FIELDS = (
    "in",
    "after",
    "before",
    "min_duration",
    "max_duration",
    "created_after",
    "created_before",
    "title",
)

TAG_FIELDS = (
    "created_after",
    "created_before",
    "title",
)  # need the container metadata recorded at index time

MAX_PATTERN_CHARS = 1000
_CACHED_FILTERS = 8  # allowed rows kept per generation (the pages of a few filtered searches)


@dataclass(frozen=True)
class SearchFilter:
    """A parsed filter (see the module docstring); `parse_filters` makes one from what users type."""

    path: str | None = None  # the `in` pattern as given
    after: float | None = None  # POSIX seconds
    before: float | None = None
    min_duration: float | None = None  # seconds
    max_duration: float | None = None
    created_after: float | None = None
    created_before: float | None = None
    title: str | None = None
    _regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.path is not None and self._regex is None:
            object.__setattr__(self, "_regex", compile_glob(self.path))
        for low, high in (("after", "before"), ("min_duration", "max_duration"),
                          ("created_after", "created_before")):  # fmt: skip
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and (a >= b if high.endswith("before") else a > b):
                raise QueryError(
                    f"the filter's {low} ({_shown(low, a)}) is past its {high} ({_shown(high, b)})"
                )

    @property
    def empty(self) -> bool:
        return all(v is None for v in self.to_dict().values())

    def fields(self) -> list[str]:
        """The fields given, by their API names."""
        return [k for k, v in self.to_dict().items() if v is not None]

    def to_dict(self) -> dict[str, Any]:
        """The fields by their API names (`in` for the path pattern), None where not given."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["in"] = out.pop("path")
        return {name: out[name] for name in FILTER_FIELDS}

    def key(self) -> tuple:
        return tuple(self.to_dict().values())

    def matches_path(self, relpath: str) -> bool:
        return self._regex is None or self._regex.fullmatch(relpath) is not None


def _shown(name: str, value: float) -> str:
    if "duration" in name:
        return f"{value:g} s"
    return dt.datetime.fromtimestamp(value, dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- parsing
def parse_filters(spec: SearchFilter | Mapping[str, Any] | None) -> SearchFilter | None:
    """A `SearchFilter` from a mapping of `FILTER_FIELDS` (values as typed: strings, numbers, datetimes; None
    or "" for a field not given), or the filter itself; None when nothing is filtered. Each bad value raises
    `QueryError` naming its field."""
    if spec is None or isinstance(spec, SearchFilter):
        return None if spec is None or spec.empty else spec
    if not isinstance(spec, Mapping):
        raise QueryError(f"filters are a mapping of {', '.join(FILTER_FIELDS)}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(FILTER_FIELDS) - {"path"})
    if unknown:
        raise QueryError(f"unknown filter {unknown[0]!r}; the filters are {', '.join(FILTER_FIELDS)}")
    given = {k: v for k, v in spec.items() if v is not None and not (isinstance(v, str) and not v.strip())}
    pattern = given.get("in", given.get("path"))
    if pattern is not None and not isinstance(pattern, str):
        raise QueryError(f"the filter 'in' is a path pattern, got {type(pattern).__name__}")
    title = given.get("title")
    if title is not None and not isinstance(title, str):
        raise QueryError(f"the filter 'title' is text, got {type(title).__name__}")
    made = SearchFilter(
        path=pattern,
        title=None if title is None else title.strip()[:MAX_PATTERN_CHARS],
        **{
            name: parse_time(given.get(name), name)
            for name in ("after", "before", "created_after", "created_before")
        },
        **{name: parse_duration(given.get(name), name) for name in ("min_duration", "max_duration")},
    )
    return None if made.empty else made


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([hdw])", re.ASCII)
_AGE_SECONDS = {"h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: Any, name: str = "time") -> float | None:
    """POSIX seconds from a date, date and time, POSIX seconds or an age (see the module docstring)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise QueryError(f"the filter {name!r} must be a finite time, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise QueryError(f"the filter {name!r} is a date or time, got {type(value).__name__}")
    text = value.strip()
    if m := _AGE.fullmatch(text.lower()):
        return time.time() - float(m.group(1)) * _AGE_SECONDS[m.group(2)]
    iso = text[:-1] + "+00:00" if text[-1:] in "Zz" else text
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise QueryError(
            f"the filter {name!r}: {value[:60]!r} is not a date (2024-05-01, 2024-05-01T10:00[Z|+hh:mm]) "
            "nor an age (30d, 12h, 2w)"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)", re.ASCII)


def parse_duration(value: Any, name: str = "duration") -> float | None:
    """Seconds from a number or "90", "90s", "1.5m", "2h"; negative or not finite is an error."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip().lower())):
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    else:
        raise QueryError(f"the filter {name!r}: {str(value)[:60]!r} is not a duration (90, 90s, 1.5m, 2h)")
    if not math.isfinite(seconds) or seconds < 0:
        raise QueryError(f"the filter {name!r} must be a non-negative duration, got {value!r}")
    return seconds


def compile_glob(pattern: str) -> re.Pattern:
    """The regular expression of a path pattern, matched against a whole path relative to the indexed folder
    ('/'-separated): `*` any characters but '/', `**` any, `**/` any folders (none included), `?` one
    character, `[abc]`/`[!abc]` one of (not of) a set. A pattern without any of these is a folder (every file
    under it) or a file. A malformed pattern raises `QueryError`."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise QueryError("the filter 'in' is empty: give a folder or a glob such as 'trips/2024/**'")
    if len(pattern) > MAX_PATTERN_CHARS or "\x00" in pattern:
        raise QueryError(f"the filter 'in' is not a usable path pattern ({len(pattern)} characters)")
    bad = f"the filter 'in' ({pattern[:80]!r})"
    if pattern.startswith("/"):
        raise QueryError(f"{bad} is absolute; paths are relative to the indexed folder ('trips/2024/**')")
    if ".." in pattern.split("/"):
        raise QueryError(f"{bad} leaves the indexed folder ('..')")
    if not any(c in pattern for c in "*?["):
        return re.compile(re.escape(pattern.strip("/")) + "(?:/.*)?", re.DOTALL)
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if pattern[i + 1 : i + 3] == "!]":
                end = pattern.find("]", i + 3)
            if end < 0:
                raise QueryError(f"{bad} is malformed: '[' at character {i + 1} is never closed")
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^/" if negate else "") + body.replace("\\", "\\\\").replace("^", "\\^") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    if pattern.endswith("/"):
        out.append(".*")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise QueryError(f"{bad} is malformed ({exc})") from None


def check_offset(offset: Any) -> int:
    """A page's offset: a non-negative integer."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise QueryError(f"offset must be a non-negative integer, got {offset!r}")
    return offset


# ---------------------------------------------------------------------------------------------- applying
@dataclass
class _Table:
    """The filterable columns of one generation: per file (in id order) and per segment."""

    paths: list[str]
    mtime: np.ndarray  # (F,) seconds
    duration: np.ndarray  # (F,)
    created: np.ndarray  # (F,) seconds, NaN where the container has none
    titles: list[str]  # lowercase, "" where none
    untagged: int  # files whose container metadata was not recorded (older index, imports)
    seg_slot: np.ndarray  # (S,) store slot of each segment
    seg_file: np.ndarray  # (S,) index of its file in the arrays above
    rows: int  # the store's rows
    lock: threading.Lock = field(default_factory=threading.Lock)
    cache: OrderedDict = field(default_factory=OrderedDict)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _table(snap: Any) -> _Table:
    """The filterable columns of a snapshot's generation, read once and kept with it."""
    with _TABLES_LOCK:
        found = _TABLES.get(snap)
    if found is not None:
        return found
    files = snap.rows("SELECT id, path, mtime_ns, duration, created, title, tags FROM files ORDER BY id")
    ids = np.array([r[0] for r in files], dtype=np.int64)
    segs = snap.rows("SELECT slot, file_id FROM segments")
    seg = np.array(segs, dtype=np.int64).reshape(-1, 2)
    table = _Table(
        paths=[r[1] for r in files],
        mtime=np.array([r[2] for r in files], dtype=np.float64) / 1e9,
        duration=np.array([r[3] for r in files], dtype=np.float64),
        created=np.array([np.nan if r[4] is None else r[4] for r in files], dtype=np.float64),
        titles=[(r[5] or "").lower() for r in files],
        untagged=sum(1 for r in files if r[6] is None),
        seg_slot=seg[:, 0],
        seg_file=np.searchsorted(ids, seg[:, 1]),
        rows=snap.store.rows,
    )
    with _TABLES_LOCK:
        return _TABLES.setdefault(snap, table)


def record_missing_tags(conn: Any, root: Any) -> int:
    """Read and record the container metadata of the indexed files that lack it (indexed before it was
    recorded; `stanvid index` calls this after encoding, so an older index gains its `created_after`,
    `created_before` and `title` filters without encoding anything again). Returns the files updated."""
    from stanvid.video.tags import container_tags

    todo = conn.execute("SELECT id, path FROM files WHERE tags IS NULL").fetchall()
    if not todo:
        return 0
    found = [(t.created, t.title, fid) for fid, rel in todo for t in [container_tags(root / rel)]]
    with _transaction(conn):
        conn.executemany("UPDATE files SET created = ?, title = ?, tags = 1 WHERE id = ?", found)
        _bump_generation(conn)  # open indexes read the new columns as a new generation
    return len(found)


def filterable(snap: Any) -> tuple[list[str], dict[str, str]]:
    """The filter fields this generation can apply, and those it cannot with the reason."""
    untagged = _table(snap).untagged
    if not untagged:
        return list(FILTER_FIELDS), {}
    why = (
        f"{untagged} of the indexed files have no recorded container metadata (indexed before it was recorded, "
        "or imported from embeddings); `stanvid index` on the folder again records it"
    )
    return [f for f in FILTER_FIELDS if f not in TAG_FIELDS], dict.fromkeys(TAG_FIELDS, why)


def allowed_rows(snap: Any, spec: SearchFilter | None, where: str = "the index") -> AllowedRows | None:
    """The rows a search of `snap` may return under `spec` (None: no filter). A field this generation cannot
    apply (`filterable`) raises `QueryError` saying why."""
    if spec is None or spec.empty:
        return None
    table = _table(snap)
    blocked = [f for f in spec.fields() if f in TAG_FIELDS] if table.untagged else []
    if blocked:
        reason = filterable(snap)[1][blocked[0]]
        raise QueryError(f"{where}: the filter(s) {', '.join(blocked)} cannot be applied: {reason}")
    key = spec.key()
    with table.lock:
        if key in table.cache:
            table.cache.move_to_end(key)
            return table.cache[key]
    keep = _files_passing(table, spec)
    slots = np.sort(table.seg_slot[keep[table.seg_file]])
    allowed = AllowedRows(slots, table.rows, live=len(table.seg_slot))
    with table.lock:
        table.cache[key] = allowed
        while len(table.cache) > _CACHED_FILTERS:
            table.cache.popitem(last=False)
    return allowed


def _files_passing(table: _Table, spec: SearchFilter) -> np.ndarray:
    """(F,) bool: the files every given field holds for."""
    keep = np.ones(len(table.paths), dtype=bool)
    bounds = (
        (spec.after, table.mtime, np.greater_equal),
        (spec.before, table.mtime, np.less),
        (spec.min_duration, table.duration, np.greater_equal),
        (spec.max_duration, table.duration, np.less_equal),
        (spec.created_after, table.created, np.greater_equal),  # NaN (no creation time) fails both
        (spec.created_before, table.created, np.less),
    )
    for bound, column, compare in bounds:
        if bound is not None:
            keep &= compare(column, bound)
    if spec.title is not None:
        needle = spec.title.lower()
        keep &= np.fromiter((needle in t for t in table.titles), dtype=bool, count=len(table.titles))
    if spec.path is not None:
        keep &= np.fromiter((spec.matches_path(p) for p in table.paths), dtype=bool, count=len(table.paths))
    return keep
