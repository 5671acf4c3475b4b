"""The moment route: `GET /api/moment/{file}?start=&end=` cuts [start, end) seconds out of an indexed file and
sends it as a download named after the file and the span (`stanvid.search.moment_export`; the page's **Cut**
button on a moment). The cut is read from the descriptor `VideoIndex.open_video` checked (a file that is gone
or changed is a 404 / 409, as for `/api/video`), made in a temporary folder and deleted once sent; a span longer
than `MAX_CUT_SECONDS` is refused, so one request's re-encoding work is bounded."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from stanvid.errors import StanvidError
from stanvid.search.index import IndexedFileError
from stanvid.search.moment_export import export_moment
from stanvid.search.server.common import (
    MAX_CUT_SECONDS,
    MAX_ID,
    BadRequest,
    IndexDep,
    Settings,
    errors,
    public,
)
from stanvid.video.decode import VIDEO_MEDIA_TYPES


def moments_router(settings: Settings) -> APIRouter:
    router = APIRouter()

    @router.get("/api/moment/{file_id}", response_class=FileResponse, responses=errors(400, 404, 409, 503))
    def moment(
        index: IndexDep,
        file_id: int = PathParam(ge=0, le=MAX_ID),
        start: float = QueryParam(ge=0, allow_inf_nan=False, description="seconds"),
        end: float = QueryParam(gt=0, allow_inf_nan=False, description="seconds"),
    ) -> FileResponse:
        # well-formed requests this file cannot answer: 409, as for a span that shows no frame of it
        if not end > start:
            raise BadRequest(409, f"the span {start:g}-{end:g} s is empty: end must be after start")
        if end - start > MAX_CUT_SECONDS:
            raise BadRequest(409, f"the span is {end - start:g} s; at most {MAX_CUT_SECONDS:g} s are cut out")
        try:
            opened = index.open_video(file_id)
        except IndexedFileError as exc:
            raise BadRequest(404 if exc.gone else 409, public(index, str(exc))) from exc
        if opened is None:
            raise BadRequest(404, f"no file with id {file_id} in this index")
        file, _, relpath = opened
        tmp = tempfile.mkdtemp(prefix="stanvid-moment-")
        try:
            with file:
                cut = export_moment(file, start, end, tmp, name=Path(relpath).name)
        except StanvidError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadRequest(
                409, f"cannot cut {relpath} at {start:g}-{end:g} s: {public(index, str(exc))}"
            ) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FileResponse(
            cut.path,
            media_type=VIDEO_MEDIA_TYPES.get(cut.path.suffix, "application/octet-stream"),
            filename=cut.path.name,
            background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
        )

    return router
