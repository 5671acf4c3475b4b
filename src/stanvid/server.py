"""HTTP front end of an index: a search page and a small JSON API (FastAPI), a thin shell over `stanvid.index`.

    GET /                          the search page (static files in stanvid/web)
    GET /api/info                  what is indexed: counts, model source, segment length
    GET /api/search?q=TEXT&k=N     ranked segments as JSON
    GET /api/thumbnail/{segment}   JPEG of the frame at the middle of a segment
    GET /api/video/{file}          the video file, with HTTP range requests (206 / 416), for seeking in <video>

Only files recorded in the index can be read, and only by their numeric id: no request carries a path, so
there is nothing to traverse. Every bad request (empty or over-long query, bad `k`, unknown or malformed id,
unsatisfiable range) gets a 4xx with a JSON `{"error": message}`, never a 500.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from stanvid.errors import StanvidError
from stanvid.index import VideoIndex, open_index
from stanvid.model import VideoCLIP

__all__ = ["create_app"]

MAX_QUERY_CHARS = 500  # CLIP reads at most 77 tokens; longer text is a mistake or abuse, not a query
MAX_K = 200
THUMBNAIL_SIZE = 180  # shortest side, pixels
_CHUNK = 1 << 18
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII)
_VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
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
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(web_dir() / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=web_dir()), name="static")

    @app.get("/api/info")
    def info() -> dict:
        return {
            "files": index.num_files(),
            "segments": len(index),
            "model": index.meta["model_source"],
            "segment_seconds": index.meta["segment_seconds"],
            "max_query_chars": max_query_chars,
            "max_k": max_k,
        }

    @app.get("/api/search")
    def search(q: str | None = None, k: str | None = None) -> dict:
        text = (q or "").strip()
        if not text:
            raise _BadRequest(400, "the query is empty: pass the text to search for as ?q=")
        if len(text) > max_query_chars:
            raise _BadRequest(
                400, f"the query is {len(text)} characters long; at most {max_query_chars} are allowed"
            )
        count = _parse_int(k, "k", default=10)
        if not 1 <= count <= max_k:
            raise _BadRequest(400, f"k must be between 1 and {max_k}, got {count}")
        hits = index.search(text, count)
        return {
            "query": text,
            "k": count,
            "results": [
                {
                    "id": hit.id,
                    "file_id": hit.file_id,
                    "path": hit.relpath,  # relative: where the folder lives on the server is not the client's business
                    "start": hit.start,
                    "end": hit.end,
                    "score": hit.score,
                    "thumbnail_url": f"/api/thumbnail/{hit.id}",
                    "video_url": f"/api/video/{hit.file_id}",
                }
                for hit in hits
            ],
        }

    @functools.lru_cache(maxsize=512)
    def thumbnail_bytes(segment_id: int) -> bytes:
        frame = index.middle_frame(segment_id, size=thumbnail_size)  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(frame.numpy()).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    @app.get("/api/thumbnail/{segment_id}")
    def thumbnail(segment_id: str) -> Response:
        sid = _parse_int(segment_id, "segment id")
        if index.segment(sid) is None:
            raise _BadRequest(404, f"no segment with id {sid} in this index")
        try:
            data = thumbnail_bytes(sid)
        except StanvidError as exc:  # the file changed or vanished since it was indexed
            raise _BadRequest(404, f"cannot read the frame of segment {sid}: {exc}") from exc
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/video/{file_id}")
    def video(file_id: str, request: Request) -> Response:
        fid = _parse_int(file_id, "file id")
        path = index.file_path(fid)
        if path is None:
            raise _BadRequest(404, f"no file with id {fid} in this index")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise _BadRequest(
                404, f"file {fid} is no longer readable on the server ({exc.strerror})"
            ) from exc
        media_type = _VIDEO_TYPES.get(path.suffix.lower(), "application/octet-stream")
        header = request.headers.get("range")
        if header is None:
            headers = {"Accept-Ranges": "bytes", "Content-Length": str(size)}
            return StreamingResponse(_read(path, 0, size), media_type=media_type, headers=headers)
        start, end = _parse_range(header, size)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Range": f"bytes {start}-{end}/{size}",
            "Content-Length": str(end - start + 1),
        }
        return StreamingResponse(
            _read(path, start, end - start + 1), 206, headers=headers, media_type=media_type
        )

    return app


def _parse_int(value: str | None, name: str, default: int | None = None) -> int:
    if value is None or value == "":
        if default is None:
            raise _BadRequest(400, f"{name} is missing")
        return default
    if not re.fullmatch(r"\d{1,18}", value, re.ASCII):
        raise _BadRequest(400, f"{name} must be a non-negative integer, got {value[:40]!r}")
    return int(value)


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


def _read(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            data = f.read(min(_CHUNK, length))
            if not data:  # the file shrank while being sent
                return
            length -= len(data)
            yield data


def index_of(app: FastAPI) -> VideoIndex:
    """The `VideoIndex` an app serves (to close it, or to inspect it in tests)."""
    return app.state.index
