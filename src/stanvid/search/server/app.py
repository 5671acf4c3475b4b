"""HTTP front end of an index: a search page and a small JSON API (FastAPI), a thin shell over `stanvid.search.index`.

This module assembles the app; the routes live in one router per concern: `search` (text, example segment,
image), `media` (thumbnails and the video files) and `info`; `common` holds the schemas and errors.

    GET /                          the search page (static files in stanvid/search/web)
    GET /api/info                  what is indexed: generation, counts, model name, segment length
    GET /api/search?q=TEXT&k=N     ranked segments as JSON (&group=file: one hit per file, with a timeline)
    POST /api/search/image?k=N     segments like the image in the request body (raw bytes, image/*); &q= adds
                                   text, &image_weight= / &text_weight= weigh the parts (stanvid.search.query)
    GET /api/like/{segment}?k=N    segments like an indexed segment ("more like this"); &q=, &like_weight=
    GET /api/thumbnail/{segment}   JPEG of the frame at the middle of a segment
    GET|HEAD /api/video/{file}     the video file, with HTTP range requests (206 / 416), for seeking in <video>

The server follows the index while `stanvid index` updates it (no restart): each request answers from one
generation of the index, named in its response (`generation`), and a run's commit is answered from as soon
as it is loaded, off the request path (`create_app`'s `follow`).

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

import contextlib
import os
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from stanvid.errors import StanvidError
from stanvid.models.video_clip import VideoCLIP
from stanvid.search.index import open_index
from stanvid.search.server.common import (
    FOLLOW_SECONDS,
    MAX_IMAGE_BYTES,
    MAX_K,
    MAX_QUERY_CHARS,  # noqa: F401 -- the default callers import from here
    THUMBNAIL_SIZE,
    BadRequest,
    Settings,
    public,
    query_char_limit,
)
from stanvid.search.server.copies import copies_router
from stanvid.search.server.info import info_router
from stanvid.search.server.media import media_router
from stanvid.search.server.moments import moments_router
from stanvid.search.server.search import search_router

__all__ = ["create_app", "web_dir"]


def web_dir() -> Path:
    """The packaged static files of the search page."""
    return Path(str(resources.files("stanvid.search") / "web"))


def create_app(
    index_path: str | os.PathLike,
    *,
    model: VideoCLIP | None = None,
    device: str | None = None,
    precision: str = "auto",
    max_query_chars: int | None = None,  # None: follows the model's tokenizer (`query_char_limit`)
    max_k: int = MAX_K,
    thumbnail_size: int = THUMBNAIL_SIZE,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    follow: float | None = FOLLOW_SECONDS,
    runtime: str | None = None,
) -> FastAPI:
    """The app for one index. The query model is loaded (and checked against the index) here, so a wrong or
    missing model fails at start-up rather than at the first query.

    The app follows the index as runs update it: while it runs, a thread checks the committed state every
    `follow` seconds (one SQLite read) and loads a new one there, so each request after the swap answers from
    it, and each request answers from one generation, which its response names (`generation`). None: serve
    the generation opened at start."""
    index = open_index(
        index_path, model=model, device=device, precision=precision, follow=follow, runtime=runtime
    )
    index.model  # noqa: B018 -- load and verify now
    chars = max_query_chars or query_char_limit(index.model.config.clip.text.context_length)
    settings = Settings(chars, max_k, thumbnail_size, max_image_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if follow:
            index.watch(follow)
        try:
            yield
        finally:
            index.stop_watching()

    app = FastAPI(title="stanvid search", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.index = index
    _add_error_handlers(app, settings)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(web_dir() / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=web_dir()), name="static")
    app.include_router(info_router(settings))
    app.include_router(search_router(settings))
    app.include_router(media_router(settings))
    app.include_router(moments_router(settings))
    app.include_router(copies_router(settings))
    return app


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Every error the app answers has the body `{"error": message}`: refused requests, unknown routes and
    methods, parameters outside the schema (400) and an index that became unreadable (503)."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes and methods: the same {"error": ...} shape as the API's own errors
        headers = exc.headers
        if exc.status_code == 405:  # Allow lists every method of the path (GET and HEAD are two routes)
            allowed = _allowed_methods(request.app, request.url.path)
            if allowed:
                headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [_explain(err, settings.max_k) for err in exc.errors()[:3]]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)

    @app.exception_handler(StanvidError)
    async def server_side(request: Request, exc: StanvidError) -> JSONResponse:
        # the index became unreadable under a running server (damaged database, ...): say so, without paths
        return JSONResponse({"error": public(request.app.state.index, str(exc))}, status_code=503)


def _allowed_methods(app: FastAPI, path: str) -> set[str]:
    """The methods the API declares for `path`, read from its OpenAPI schema (which lists every route of the
    routers, whatever the router classes hold internally)."""
    for template, operations in app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            return {method.upper() for method in operations}
    return set()


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
