"""The filter and page parameters of the search routes (`in`, `after`, `before`, `min_duration`,
`max_duration`, `created_after`, `created_before`, `title`, `offset`), read into one `SearchFilter`.

A value that does not parse, an inverted range, a malformed glob, or a field this index cannot apply (its
files' container metadata was never recorded) is a 422 naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi import Query as QueryParam

from stanvid.search.index import VideoIndex
from stanvid.search.index.filters import MAX_PATTERN_CHARS, SearchFilter, parse_filters
from stanvid.search.query import QueryError
from stanvid.search.server.common import BadRequest, IndexDep, public

MAX_OFFSET = 10_000  # deeper pages cost a search that deep; past this a query should be narrowed instead


@dataclass(frozen=True)
class Page:
    """A request's filter (None: every file) and the hits it skips."""

    filters: SearchFilter | None
    offset: int


def _text(description: str) -> str | None:
    return QueryParam(None, max_length=MAX_PATTERN_CHARS, description=description)


def page_params(
    index: IndexDep,
    in_: str | None = QueryParam(
        None,
        alias="in",
        max_length=MAX_PATTERN_CHARS,
        description="only files under this folder or matching this glob ('trips/2024/**')",
    ),  # fmt: skip
    after: str | None = _text("only files modified at or after this date, time or age (2024-05-01, 30d)"),
    before: str | None = _text("only files modified before this date, time or age"),
    min_duration: str | None = _text("only videos at least this long (seconds, 90s, 1.5m)"),
    max_duration: str | None = _text("only videos at most this long"),
    created_after: str | None = _text(
        "only videos recorded at or after this (the container's creation time)"
    ),
    created_before: str | None = _text("only videos recorded before this"),
    title: str | None = _text("only videos whose container title contains this text"),
    offset: int = QueryParam(0, ge=0, le=MAX_OFFSET, description="skip this many results (the next page)"),
) -> Page:
    raw = {"in": in_, "after": after, "before": before, "min_duration": min_duration,
           "max_duration": max_duration, "created_after": created_after, "created_before": created_before,
           "title": title}  # fmt: skip
    try:
        spec = parse_filters(raw)
    except QueryError as exc:
        raise BadRequest(422, str(exc)) from exc
    check_applicable(index, spec)
    return Page(spec, offset)


def check_applicable(index: VideoIndex, spec: SearchFilter | None) -> None:
    """A 422 for a field the index cannot apply, saying why."""
    if spec is None:
        return
    unavailable = index.filterable()[1]
    blocked = [f for f in spec.fields() if f in unavailable]
    if blocked:
        reason = unavailable[blocked[0]]
        raise BadRequest(422, public(index, f"this index cannot filter on {', '.join(blocked)}: {reason}"))


PageDep = Annotated[Page, Depends(page_params)]  # a route parameter: the request's filter and offset
