"""The info route: what is indexed (`/api/info`: the generation and its counts, model name, segment length, the
limits of this app, the fields it can filter on)."""

from __future__ import annotations

from fastapi import APIRouter

from stanvid.search.server.common import IndexDep, InfoBody, Settings, errors, public
from stanvid.search.server.filters import MAX_OFFSET


def info_router(settings: Settings) -> APIRouter:
    router = APIRouter()

    @router.get("/api/info", response_model=InfoBody, responses=errors(503))
    def info(
        index: IndexDep,
    ) -> dict:
        fields, unavailable = index.filterable()
        return {  # one generation: the request's view of the index
            "generation": index.generation,
            "files": index.num_files(),
            "segments": len(index),
            "model": index.model_name,
            "segment_seconds": index.meta["segment_seconds"],
            "max_query_chars": settings.max_query_chars,
            "max_k": settings.max_k,
            "max_image_bytes": settings.max_image_bytes,
            "filters": fields,
            "filters_unavailable": {f: public(index, why) for f, why in unavailable.items()},
            "max_offset": MAX_OFFSET,
        }

    return router
