"""The copies route: `/api/copies/{file_id}`, the files that hold footage of an indexed file (re-encoded,
trimmed, scaled copies), each with the span of it that matches (`stanvid.search.duplicates.find_copies`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from pydantic import BaseModel

from stanvid.search.query import QueryError
from stanvid.search.server.common import MAX_ID, BadRequest, IndexDep, Settings, errors, public


class CopyBody(BaseModel):
    file_id: int
    path: str
    start: float  # the span of the copy that matches
    end: float
    source_start: float  # the span of the file asked about
    source_end: float
    segments: int
    score: float
    video_url: str
    play_url: str


class CopiesBody(BaseModel):
    generation: int
    file_id: int
    path: str
    threshold: float | None
    copies: list[CopyBody]


def copies_router(settings: Settings) -> APIRouter:
    router = APIRouter()

    @router.get("/api/copies/{file_id}", response_model=CopiesBody, responses=errors(400, 404, 422, 503))
    def copies(
        index: IndexDep,
        file_id: int = PathParam(ge=0, le=MAX_ID),
        threshold: float | None = QueryParam(
            None, gt=0, le=1, description="segment cosine of one footage (default: the measured one)"
        ),
    ) -> dict:
        path = index.file_relpath(file_id)
        if path is None:
            raise BadRequest(404, f"no file with id {file_id} in this index")
        try:
            found = index.copies(file_id, threshold)
        except QueryError as exc:
            raise BadRequest(422, public(index, str(exc))) from exc
        return {
            "generation": index.generation,
            "file_id": file_id,
            "path": path,
            "threshold": threshold,
            "copies": [
                {
                    "file_id": m.b_file_id,
                    "path": m.b,
                    "start": m.b_start,
                    "end": m.b_end,
                    "source_start": m.a_start,
                    "source_end": m.a_end,
                    "segments": m.segments,
                    "score": m.score,
                    "video_url": f"/api/video/{m.b_file_id}",
                    "play_url": f"/api/video/{m.b_file_id}#t={m.b_start:.3f}",
                }
                for m in found
            ],
        }

    return router
