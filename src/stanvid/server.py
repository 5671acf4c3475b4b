"""HTTP front end of an index: a search page and a small JSON API (FastAPI), a thin shell over `stanvid.index`.

    GET /                          the search page (static files in stanvid/web)
    GET /api/info                  what is indexed: counts, model name, segment length
    GET /api/search?q=TEXT&k=N     ranked segments as JSON (&group=file: one hit per file, with a timeline)
    POST /api/search/image?k=N     segments like the image in the request body (raw bytes, image/*); &q= adds
                                   text, &image_weight= / &text_weight= weigh the parts (stanvid.query)
    GET /api/like/{segment}?k=N    segments like an indexed segment ("more like this"); &q=, &like_weight=
    GET /api/thumbnail/{segment}   JPEG of the frame at the middle of a segment
    GET|HEAD /api/video/{file}     the video file, with HTTP range requests (206 / 416), for seeking in <video>

Only files recorded in the index can be read, and only by their numeric id: no request carries a path, so
there is nothing to traverse. A file is served only while it still is the file that was indexed: a regular
file whose real path (symbolic links resolved at request time) lies inside the indexed folder, with the size,
mtime, device and inode recorded when it was indexed (`VideoIndex.open_video`); otherwise 404 (gone) or 409
(changed). Responses name files relative to the indexed folder and the model by its name: no absolute path of
the server leaves it. Every bad request (empty or over-long query, bad `k`, unknown or malformed id,
unsatisfiable range) gets a 4xx with a JSON `{"error": message}`, never a 500; the OpenAPI schema
(`/openapi.json`) declares each route's status codes and content types.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from stanvid.errors import StanvidError
from stanvid.index import IndexedFileError, SearchResult, open_index
from stanvid.model import VideoCLIP
from stanvid.query import FileHit, QueryError
from stanvid.query import Query as SearchQuery
from stanvid.query import search as search_query
from stanvid.video_io import VIDEO_MEDIA_TYPES

__all__ = ["create_app"]

MAX_QUERY_CHARS = 500  # CLIP reads at most 77 tokens; longer text is a mistake or abuse, not a query
MAX_K = 200
MAX_IMAGE_BYTES = 20 << 20  # an upload larger than this is refused (413) before it is decoded
THUMBNAIL_SIZE = 180  # shortest side, pixels
_CHUNK = 1 << 18
_MAX_ID = 10**18 - 1  # ids are SQLite rowids; 18 digits keep every one within int64
_BLANK = " \t\n\r\f\v"  # what a query may not consist of only (the same set in the schema's pattern)
_NOT_BLANK = "[^ \t\n\r\f\v]"
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})", re.ASCII)  # 18 digits: beyond any file, within int64


class ErrorBody(BaseModel):
    error: str


class InfoBody(BaseModel):
    files: int
    segments: int
    model: str
    segment_seconds: float | None
    max_query_chars: int
    max_k: int
    max_image_bytes: int


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


class SearchBody(BaseModel):
    query: str | None
    k: int
    group: str | None = None
    like: int | None = None
    image: bool | None = None
    results: list[HitBody]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": "error message"} for code in codes}


def _binary(types: Any, description: str) -> dict[str, Any]:
    schema = {"type": "string", "format": "binary"}
    return {"description": description, "content": {t: {"schema": schema} for t in types}}


_VIDEO_RESPONSES = {
    200: _binary([*dict.fromkeys(VIDEO_MEDIA_TYPES.values()), "application/octet-stream"], "the whole file"),
    206: _binary(
        [*dict.fromkeys(VIDEO_MEDIA_TYPES.values()), "application/octet-stream"], "the requested range"
    ),
    **_errors(400, 404, 409, 416, 503),
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def web_dir() -> Path:
    """The packaged static files of the search page."""
    return Path(str(resources.files("stanvid") / "web"))


def create_app(
    index_path: str | os.PathLike,
    *,
    model: VideoCLIP | None = None,
    device: str | None = None,
    precision: str = "auto",
    max_query_chars: int = MAX_QUERY_CHARS,
    max_k: int = MAX_K,
    thumbnail_size: int = THUMBNAIL_SIZE,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> FastAPI:
    """The app for one index. The query model is loaded (and checked against the index) here, so a wrong or
    missing model fails at start-up rather than at the first query."""
    index = open_index(index_path, model=model, device=device, precision=precision)
    index.model  # noqa: B018 -- load and verify now
    app = FastAPI(title="stanvid search", docs_url=None, redoc_url=None)
    app.state.index = index

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, exc: _BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes and methods: the same {"error": ...} shape as the API's own errors
        headers = exc.headers
        if exc.status_code == 405:  # Allow lists every method of the path (GET and HEAD are two routes)
            allowed = {
                method
                for route in app.router.routes
                if isinstance(route, Route)
                and route.methods
                and route.matches(request.scope)[0] != Match.NONE
                for method in route.methods
            }
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a parameter outside what the OpenAPI schema declares: 400 with the same {"error": ...} shape
        parts = [_explain(err, max_k) for err in exc.errors()[:3]]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)

    @app.exception_handler(StanvidError)
    async def server_side(request: Request, exc: StanvidError) -> JSONResponse:
        # the index became unreadable under a running server (damaged database, ...): say so, without paths
        return JSONResponse({"error": _public(str(exc))}, status_code=503)

    def _public(message: str) -> str:
        """A message without the server's absolute paths: files relative to the folder, the index by name."""
        for prefix, shown in (
            (f"{index.root}/", ""),
            (str(index.root), "."),
            (str(index.path), index.path.name),
        ):
            message = message.replace(prefix, shown)
        return message

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(web_dir() / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=web_dir()), name="static")

    @app.get("/api/info", response_model=InfoBody, responses=_errors(503))
    def info() -> dict:
        return {
            "files": index.num_files(),
            "segments": len(index),
            "model": index.model_name,
            "segment_seconds": index.meta["segment_seconds"],
            "max_query_chars": max_query_chars,
            "max_k": max_k,
            "max_image_bytes": max_image_bytes,
        }

    def optional_text(q: str | None) -> str | None:
        text = (q or "").strip(_BLANK)
        if len(text) > max_query_chars:
            raise _BadRequest(
                400, f"the query is {len(text)} characters long; at most {max_query_chars} are allowed"
            )
        return text or None

    def run_query(query: SearchQuery, k: int, group: str | None, echo: dict) -> dict:
        try:
            hits = search_query(index, query, k, group_by=group)
        except QueryError as exc:
            raise _BadRequest(400, _public(str(exc))) from exc
        return {**echo, "k": k, "group": group, "results": [_hit_json(h) for h in hits]}

    k_param = Query(10, ge=1, le=max_k, description="number of results")
    group_param = Query(None, description="'file': one hit per file (its best segment) with a timeline")
    q_extra = Query(None, max_length=max_query_chars, description="text to combine with the example")

    def weight_param(name: str) -> Any:
        return Query(1.0, ge=0, allow_inf_nan=False, description=f"weight of the {name} in the combination")

    @app.get("/api/search", response_model=SearchBody, responses=_errors(400, 503))
    def search(
        q: str = Query(
            description="what to search for",
            min_length=1,
            max_length=max_query_chars,
            pattern=_NOT_BLANK,
        ),
        k: int = k_param,
        group: Literal["file"] | None = group_param,
    ) -> dict:
        text = optional_text(q)
        if text is None:
            raise _BadRequest(400, "the query is empty: pass the text to search for as ?q=")
        return run_query(SearchQuery(text=text), k, group, {"query": text})

    @app.get("/api/like/{segment_id}", response_model=SearchBody, responses=_errors(400, 404, 503))
    def like(
        segment_id: int = PathParam(ge=0, le=_MAX_ID),
        k: int = k_param,
        q: str | None = q_extra,
        like_weight: float = weight_param("example segment"),
        text_weight: float = weight_param("text"),
        group: Literal["file"] | None = group_param,
    ) -> dict:
        if index.segment(segment_id) is None:
            raise _BadRequest(404, f"no segment with id {segment_id} in this index")
        text = optional_text(q)
        query = SearchQuery(text=text, like=segment_id, like_weight=like_weight, text_weight=text_weight)
        return run_query(query, k, group, {"query": text, "like": segment_id})

    @app.post(
        "/api/search/image",
        response_model=SearchBody,
        responses=_errors(400, 413, 415, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                **_binary(["image/jpeg", "image/png", "application/octet-stream"], "the image itself"),
            }
        },
    )
    async def search_image(
        request: Request,
        k: int = k_param,
        q: str | None = q_extra,
        image_weight: float = weight_param("image"),
        text_weight: float = weight_param("text"),
        group: Literal["file"] | None = group_param,
    ) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise _BadRequest(
                415,
                f"send the image itself as the request body (Content-Type image/*), not {kind[:60] or 'nothing'}",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_image_bytes:
            raise _BadRequest(413, f"the image is {declared} bytes; at most {max_image_bytes} are allowed")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_image_bytes:
                raise _BadRequest(413, f"the image is larger than the {max_image_bytes} bytes allowed")
        if not data:
            raise _BadRequest(400, "the request body is empty: send the image as the body")
        text = optional_text(q)
        query = SearchQuery(text=text, image=bytes(data), image_weight=image_weight, text_weight=text_weight)
        return await run_in_threadpool(run_query, query, k, group, {"query": text, "image": True})

    @functools.lru_cache(maxsize=512)
    def thumbnail_bytes(segment_id: int) -> bytes:
        frame = index.middle_frame(segment_id, size=thumbnail_size)  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(frame.numpy()).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    @app.get(
        "/api/thumbnail/{segment_id}",
        response_class=Response,
        responses={200: _binary(["image/jpeg"], "JPEG of the middle frame"), **_errors(400, 404, 409, 503)},
    )
    def thumbnail(segment_id: int = PathParam(ge=0, le=_MAX_ID)) -> Response:
        sid = segment_id
        if index.segment(sid) is None:
            raise _BadRequest(404, f"no segment with id {sid} in this index")
        try:
            data = thumbnail_bytes(sid)
        except IndexedFileError as exc:
            raise _BadRequest(404 if exc.gone else 409, f"segment {sid}: {_public(str(exc))}") from exc
        except StanvidError as exc:  # the file can no longer be decoded
            raise _BadRequest(409, f"cannot read the frame of segment {sid}: {_public(str(exc))}") from exc
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    def video(fid: int, range_header: str | None, head: bool) -> Response:
        try:
            opened = index.open_video(fid)
        except IndexedFileError as exc:
            raise _BadRequest(404 if exc.gone else 409, _public(str(exc))) from exc
        if opened is None:
            raise _BadRequest(404, f"no file with id {fid} in this index")
        file, st, relpath = opened
        try:
            size = st.st_size
            media_type = VIDEO_MEDIA_TYPES.get(Path(relpath).suffix.lower(), "application/octet-stream")
            headers = {"Accept-Ranges": "bytes"}
            status, start, length = 200, 0, size
            if range_header is not None:
                start, end = _parse_range(range_header, size)
                status, length = 206, end - start + 1
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(length)
        except BaseException:
            file.close()
            raise
        if head:
            file.close()
            return Response(status_code=status, headers=headers, media_type=media_type)
        return StreamingResponse(_read(file, start, length), status, headers=headers, media_type=media_type)

    @app.get("/api/video/{file_id}", response_class=Response, responses=_VIDEO_RESPONSES)
    def video_get(
        file_id: int = PathParam(ge=0, le=_MAX_ID),
        byte_range: str | None = Header(None, alias="range", include_in_schema=False),
    ) -> Response:
        return video(file_id, byte_range, head=False)

    @app.head("/api/video/{file_id}", response_class=Response, responses=_VIDEO_RESPONSES)
    def video_head(
        file_id: int = PathParam(ge=0, le=_MAX_ID),
        byte_range: str | None = Header(None, alias="range", include_in_schema=False),
    ) -> Response:
        """The headers a GET would answer (type, length, ranges), without the body: players probe with it."""
        return video(file_id, byte_range, head=True)

    return app


def _explain(err: dict[str, Any], max_k: int) -> str:
    """One sentence for a parameter the schema rejected, naming the parameter and the value it got."""
    loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "header")]
    name = ".".join(loc) or "request"
    value = err.get("input")
    got = f", got {str(value)[:40]!r}" if isinstance(value, (str, int, float)) else ""
    kind = err.get("type", "")
    if name == "k":
        return f"k must be between 1 and {max_k}{got}"
    if name == "group":
        return f"group must be 'file' or left out{got}"
    if name in ("segment_id", "file_id"):
        return f"{name.replace('_', ' ')} must be a non-negative integer{got}"
    if name.endswith("_weight"):
        if kind == "float_parsing":
            return f"{name} must be a number{got}"
        return f"{name} must be a finite non-negative number{got}"
    return f"{name}: {err.get('msg', 'invalid')}"


def _hit_json(hit: SearchResult | FileHit) -> dict:
    """A hit as the page uses it; a grouped hit adds the scores of all segments of its file (`timeline`)."""
    best = hit.best if isinstance(hit, FileHit) else hit
    out = {
        "id": best.id,
        "file_id": best.file_id,
        "path": best.relpath,  # relative: where the folder lives on the server is not the client's business
        "start": best.start,
        "end": best.end,
        "score": best.score,
        "thumbnail_url": f"/api/thumbnail/{best.id}",
        "video_url": f"/api/video/{best.file_id}",
        "play_url": f"/api/video/{best.file_id}#t={best.start:.3f}",  # a media fragment: plays from the moment
        "like_url": f"/api/like/{best.id}",
    }
    if isinstance(hit, FileHit):
        out["timeline"] = hit.timeline
    return out


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """First and last byte (inclusive) of a single `bytes=` range (RFC 9110 14.1.2); 416 when unsatisfiable."""
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise _BadRequest(
            416, f"unsupported Range header {header[:60]!r}: one 'bytes=start-end' range", unsatisfiable
        )
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _BadRequest(416, f"range {header!r} selects no bytes of a {size}-byte file", unsatisfiable)
        return max(0, size - length), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        raise _BadRequest(416, f"range {header!r} ends before it starts", unsatisfiable)
    if start >= size:
        raise _BadRequest(416, f"range {header!r} starts past the end of the {size}-byte file", unsatisfiable)
    return start, size - 1 if last == "" else min(int(last), size - 1)


def _read(file: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    """`length` bytes from `start` of an open file (the one `open_video` checked), closed at the end."""
    with file as f:
        f.seek(start)
        while length > 0:
            data = f.read(min(_CHUNK, length))
            if not data:  # the file shrank while being sent
                return
            length -= len(data)
            yield data
