"""The search routes: text (`/api/search`), "more like this" (`/api/like/{segment}`) and an uploaded picture
(`POST /api/search/image`), each optionally grouped per file (`&group=file`, with a timeline per hit)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from starlette.concurrency import run_in_threadpool

from stanvid.search.index import SearchResult, VideoIndex
from stanvid.search.query import FileHit, Query, QueryError
from stanvid.search.query import search as search_query
from stanvid.search.server.common import (
    MAX_ID,
    MAX_PAD,
    BadRequest,
    IndexDep,
    SearchBody,
    Settings,
    binary,
    errors,
    public,
)
from stanvid.search.server.filters import Page, PageDep

_BLANK = " \t\n\r\f\v"  # what a query may not consist of only (the same set in the schema's pattern)
_NOT_BLANK = "[^ \t\n\r\f\v]"


def search_router(settings: Settings) -> APIRouter:
    """The text and "more like this" routes, their limits (`k`, query length) declared in the schema."""
    router = APIRouter()
    k_param = QueryParam(10, ge=1, le=settings.max_k, description="number of results")
    group_param = QueryParam(None, description="'file': one hit per file (its best segment) with a timeline")
    q_extra = QueryParam(
        None, max_length=settings.max_query_chars, description="text to combine with the example"
    )
    moments_param = QueryParam(
        False, description="each hit's start and end bound the moment the query describes"
    )
    pad_param = QueryParam(
        0.0, ge=0, le=MAX_PAD, allow_inf_nan=False, description="seconds added to each moment"
    )

    @router.get("/api/search", response_model=SearchBody, responses=errors(400, 422, 503))
    def search(
        index: IndexDep,
        page: PageDep,
        q: str = QueryParam(
            description="what to search for",
            min_length=1,
            max_length=settings.max_query_chars,
            pattern=_NOT_BLANK,
        ),
        k: int = k_param,
        group: Literal["file"] | None = group_param,
        moments: bool = moments_param,
        pad: float = pad_param,
    ) -> dict:
        text = optional_text(q, settings)
        if text is None:
            raise BadRequest(400, "the query is empty: pass the text to search for as ?q=")
        return run_query(index, Query(text=text), k, group, {"query": text}, page, moments=moments, pad=pad)

    @router.get("/api/like/{segment_id}", response_model=SearchBody, responses=errors(400, 404, 422, 503))
    def like(
        index: IndexDep,
        page: PageDep,
        segment_id: int = PathParam(ge=0, le=MAX_ID),
        k: int = k_param,
        q: str | None = q_extra,
        like_weight: float = weight_param("example segment"),
        text_weight: float = weight_param("text"),
        group: Literal["file"] | None = group_param,
        moments: bool = moments_param,
        pad: float = pad_param,
    ) -> dict:
        if index.segment(segment_id) is None:
            raise BadRequest(404, f"no segment with id {segment_id} in this index")
        text = optional_text(q, settings)
        query = Query(text=text, like=segment_id, like_weight=like_weight, text_weight=text_weight)
        echo = {"query": text, "like": segment_id}
        return run_query(index, query, k, group, echo, page, moments=moments, pad=pad)

    add_image_route(router, settings, k_param, group_param, q_extra)
    return router


def add_image_route(
    router: APIRouter, settings: Settings, k_param: Any, group_param: Any, q_extra: Any
) -> None:
    """`POST /api/search/image`: the picture is the raw request body (image/*), at most `max_image_bytes`."""
    limit = settings.max_image_bytes

    @router.post(
        "/api/search/image",
        response_model=SearchBody,
        responses=errors(400, 413, 415, 422, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                **binary(["image/jpeg", "image/png", "application/octet-stream"], "the image itself"),
            }
        },
    )
    async def search_image(
        index: IndexDep,
        page: PageDep,
        request: Request,
        k: int = k_param,
        q: str | None = q_extra,
        image_weight: float = weight_param("image"),
        text_weight: float = weight_param("text"),
        group: Literal["file"] | None = group_param,
    ) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise BadRequest(
                415,
                f"send the image itself as the request body (Content-Type image/*), not {kind[:60] or 'nothing'}",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdecimal() and int(declared) > limit:
            raise BadRequest(413, f"the image is {declared} bytes; at most {limit} are allowed")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise BadRequest(413, f"the image is larger than the {limit} bytes allowed")
        if not data:
            raise BadRequest(400, "the request body is empty: send the image as the body")
        text = optional_text(q, settings)
        query = Query(text=text, image=bytes(data), image_weight=image_weight, text_weight=text_weight)
        echo = {"query": text, "image": True}
        return await run_in_threadpool(run_query, index, query, k, group, echo, page)


def weight_param(name: str) -> Any:
    return QueryParam(1.0, ge=0, allow_inf_nan=False, description=f"weight of the {name} in the combination")


def optional_text(q: str | None, settings: Settings) -> str | None:
    """The query text without surrounding blanks (None when there is none); over-long text is a 400."""
    text = (q or "").strip(_BLANK)
    if len(text) > settings.max_query_chars:
        raise BadRequest(
            400, f"the query is {len(text)} characters long; at most {settings.max_query_chars} are allowed"
        )
    return text or None


def run_query(
    index: VideoIndex,
    query: Query,
    k: int,
    group: str | None,
    echo: dict,
    page: Page | None = None,
    *,
    moments: bool = False,
    pad: float = 0.0,
) -> dict:
    page = page or Page(None, 0)
    try:
        hits = search_query(
            index,
            query,
            k,
            group_by=group,
            moments=moments,
            pad=pad,
            filters=page.filters,
            offset=page.offset,
        )
    except QueryError as exc:
        raise BadRequest(400, public(index, str(exc))) from exc
    filters = None if page.filters is None else page.filters.to_dict()
    body = {
        "generation": index.generation,
        **echo,
        "k": k,
        "offset": page.offset,
        "filters": None if filters is None else {name: v for name, v in filters.items() if v is not None},
        "group": group,
    }
    if not moments:
        return {**body, "results": [hit_json(h) for h in hits]}
    durations = index.file_durations([h.file_id for h in hits])
    note = public(index, index.moments_note()) or None
    results = [moment_json(h, durations.get(h.file_id)) for h in hits]
    return {**body, "moments": True, "moments_note": note, "results": results}


def moment_json(hit: SearchResult, duration: float | None) -> dict:
    """A moment as the page uses it: plays from its start and stops at its end (`#t=start,end`), drawn on its
    file's timeline (`duration`), and can be cut out (`export_url`)."""
    span = f"start={hit.start:.3f}&end={hit.end:.3f}"
    return {
        **hit_json(hit),
        "play_url": f"/api/video/{hit.file_id}#t={hit.start:.3f},{hit.end:.3f}",
        "export_url": f"/api/moment/{hit.file_id}?{span}",
        "duration": duration,
    }


def hit_json(hit: SearchResult | FileHit) -> dict:
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
