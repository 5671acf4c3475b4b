"""What the routers share: the response schemas, the settings of one app, the error type every route raises,
and the index of the request.

Every bad request (empty or over-long query, bad `k`, unknown or malformed id, unsatisfiable range) raises
`BadRequest`, which the app answers as a 4xx with a JSON `{"error": message}`, never a 500. Messages pass
through `public` so that no absolute path of the server leaves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from stanvid.search.index import VideoIndex

MAX_QUERY_CHARS = 500  # CLIP reads at most 77 tokens; longer text is a mistake or abuse, not a query


def query_char_limit(context_length: int) -> int:
    """The query length the server accepts for a text tower of `context_length` tokens: 7 characters a token
    (what its tokenizer can still read before truncating, in practice), at least `MAX_QUERY_CHARS`."""
    return max(MAX_QUERY_CHARS, 7 * context_length)


MAX_K = 200
MAX_IMAGE_BYTES = 20 << 20  # an upload larger than this is refused (413) before it is decoded
THUMBNAIL_SIZE = 180  # shortest side, pixels
MAX_ID = 10**18 - 1  # ids are SQLite rowids; 18 digits keep every one within int64
MAX_PAD = 3600.0  # seconds a moment may be widened by (`&pad=`)
MAX_CUT_SECONDS = 600.0  # the longest moment `/api/moment` cuts out (re-encoding is bounded by it)
FOLLOW_SECONDS = 0.5  # the server checks the index for an update this often (one SQLite read)


@dataclass(frozen=True)
class Settings:
    """The limits one app enforces (and `/api/info` reports)."""

    max_query_chars: int = MAX_QUERY_CHARS
    max_k: int = MAX_K
    thumbnail_size: int = THUMBNAIL_SIZE
    max_image_bytes: int = MAX_IMAGE_BYTES


class ErrorBody(BaseModel):
    error: str


class InfoBody(BaseModel):
    generation: int  # the generation of the index these counts are of (see `VideoIndex.generation`)
    files: int
    segments: int
    model: str
    segment_seconds: float | None
    max_query_chars: int
    max_k: int
    max_image_bytes: int
    filters: list[str] = []  # the filter fields this index can apply (`stanvid.search.index.filters`)
    filters_unavailable: dict[str, str] = {}  # field -> why this index cannot apply it
    max_offset: int = 0


class TimelinePoint(BaseModel):
    id: int
    start: float
    end: float
    score: float


class HitBody(BaseModel):
    id: int
    file_id: int
    path: str
    start: float
    end: float
    score: float
    thumbnail_url: str
    video_url: str
    play_url: str  # the video with a `#t=` media fragment: plays from the segment's start
    like_url: str  # "more like this"
    timeline: list[TimelinePoint] | None = None  # grouped per file: every segment of the file, in time order
    export_url: str | None = None  # a moment (`&moments=true`): the moment cut out as a file
    duration: float | None = None  # a moment: the duration of its file (to draw it on the file's timeline)


class SearchBody(BaseModel):
    generation: int  # the generation of the index every hit comes from
    query: str | None
    k: int
    offset: int = 0
    filters: dict[str, Any] | None = None  # the filter applied, parsed (times as POSIX seconds)
    group: str | None = None
    like: int | None = None
    image: bool | None = None
    moments: bool | None = None  # `&moments=true`: each hit's start and end bound the moment
    moments_note: str | None = None  # why (some) hits are fixed segments, when the index lacks moments
    results: list[HitBody]


class BadRequest(Exception):
    """A request the API refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error status codes, each with the `{"error": ...}` body."""
    return {code: {"model": ErrorBody, "description": "error message"} for code in codes}


def binary(types: Any, description: str) -> dict[str, Any]:
    """An OpenAPI response (or request body) of raw bytes in any of `types`."""
    schema = {"type": "string", "format": "binary"}
    return {"description": description, "content": {t: {"schema": schema} for t in types}}


def request_index(request: Request) -> Iterator[VideoIndex]:
    """The index the request is answered from (a FastAPI dependency): a view of one generation, held until
    the request is answered (`VideoIndex.pinned`), so a search, its hits' files and a count never mix two
    states of an index a run is updating."""
    with request.app.state.index.pinned() as view:
        yield view


def public(index: VideoIndex, message: str) -> str:
    """A message without the server's absolute paths: files relative to the folder, the index by name."""
    for prefix, shown in (
        (f"{index.root}/", ""),
        (str(index.root), "."),
        (str(index.path), index.path.name),
    ):
        message = message.replace(prefix, shown)
    return message


IndexDep = Annotated[VideoIndex, Depends(request_index)]  # a route parameter: the index of the request
