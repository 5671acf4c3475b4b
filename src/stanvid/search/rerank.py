"""Search with a Mug-STAN model: FAISS finds candidates by pooled cosine, the Mug head re-ranks them.

The Mug head (`stanvid.models.mug`) scores a caption against a video from per-token text and per-frame video features,
so it cannot be an inner-product index. `stanvid index` with a model whose config says ``similarity: mug`` stores
each segment's per-frame vectors beside its pooled, normalized embedding (table ``segment_frames``, float32
``(T, D)``); `VideoIndex.search` then takes FAISS's ``max(k, CANDIDATES)`` nearest segments by the pooled cosine
and orders them by the head's score, which becomes the result's ``score``. A segment outside the candidates is
never returned, so recall is bounded by the pooled cosine's top ``CANDIDATES``; the cost per query is one
text encoding, one FAISS search, reading ``CANDIDATES x T x D`` floats from SQLite and the head over them
(``python benchmarks/mug_head.py`` measures the head: about 1.5 ms for 100 candidates of 12 x 512 on 2 cores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from stanvid.errors import VideoIndexError
from stanvid.models.mug import mug_similarity

__all__ = ["CANDIDATES", "QUERY_TOKENS", "keeps_frame_vectors", "frames_blob", "blob_frames", "rerank"]

CANDIDATES = 100  # FAISS candidates re-ranked per query (at least k)
QUERY_TOKENS = (
    32  # the query's token columns (more when the caption is longer), as the official text pipeline
)


def keeps_frame_vectors(model: Any) -> bool:
    """Whether an index built by ``model`` stores per-frame vectors (its similarity is the Mug head)."""
    return getattr(getattr(model, "config", None), "similarity", "cosine") == "mug"


def frames_blob(frames: np.ndarray) -> bytes:
    """(T, D) per-frame vectors -> the bytes stored in SQLite (float32, row-major)."""
    return np.ascontiguousarray(frames, dtype=np.float32).tobytes()


def blob_frames(blob: bytes, dim: int, where: str) -> np.ndarray:
    """The stored bytes -> (T, D) float32; a blob that is not whole rows of ``dim`` floats is reported."""
    if not isinstance(blob, bytes) or len(blob) == 0 or len(blob) % (4 * dim):
        raise VideoIndexError(f"{where}: stored per-frame vectors are corrupt (not rows of {dim} float32)")
    return np.frombuffer(blob, dtype=np.float32).reshape(-1, dim)


@torch.inference_mode()
def rerank(
    index: Any, text: str, k: int, candidates: int = CANDIDATES, *, filters: Any = None, offset: int = 0
) -> list:
    """The ``k`` best segments for ``text`` by the Mug head, among FAISS's ``max(k, candidates)`` nearest.

    ``index`` is an open `stanvid.search.index.VideoIndex` whose model uses the head. The candidates and their
    per-frame vectors are read from one generation of it (`VideoIndex.pinned`), so ``min(k, segments)`` come
    back whatever a run deletes meanwhile. `filters` restrict the candidates (`VideoIndex.search_embeddings`);
    `offset` skips the first hits of the head's order.
    """
    with index.pinned() as view:
        return _rerank(view, text, k + offset, candidates, filters)[offset:]


def _rerank(index: Any, text: str, k: int, candidates: int, filters: Any = None) -> list:
    found = index.search_embeddings(index.embed_text([text]), max(k, candidates), filters=filters)[0]
    if not found:
        return []
    frames = index.segment_frames([r.id for r in found])
    missing = [r.id for r in found if r.id not in frames]
    if missing:
        raise VideoIndexError(
            f"{index.path}: segments {missing[:5]} have no per-frame vectors; the index was not built by a "
            f"Mug-STAN model (rebuild it with `stanvid index` and this model)"
        )
    lengths = {frames[r.id].shape[0] for r in found}
    if len(lengths) != 1:
        raise VideoIndexError(
            f"{index.path}: segments were stored with different frame counts {sorted(lengths)}"
        )
    tokens, mask = index.embed_text_tokens([text], QUERY_TOKENS)  # (1, L, D), (1, L)
    stacked = torch.from_numpy(np.stack([frames[r.id] for r in found]))  # (n, T, D)
    cfg = index.model.config
    scores = mug_similarity(tokens, mask, stacked, tau=cfg.mug_tau, mode=cfg.mug_mode)[0]  # (n,)
    order = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
    return [dataclasses.replace(found[i], score=float(scores[i])) for i in order]
