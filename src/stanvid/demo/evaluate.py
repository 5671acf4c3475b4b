"""Text-to-video evaluation of the demo's models on its two test galleries.

Each gallery is read by the library's dataset (`stanvid.data.RetrievalDataset`, evaluation mode: the fixed
uniform frames, CLIP's centre crop and normalization) and scored with cosine similarity.

**Ties.** A model blind to frame order gives a clip and its reversal the same embedding, up to float32
rounding of the same sum taken in another order. `stanvid.training.metrics.retrieval_metrics` counts every tie
against the query (the safe rule for a benchmark), which would put such a model at R@1 = 0 on queries it can
narrow down to the right pair: below chance, when it is exactly at chance. The demo therefore reports the
*expected* recall under a random tie-break (`expected_recall`: `retrieval_metrics` with
``ties="expected"``), with scores closer than `TIE_TOLERANCE` counted as tied; on a matrix without ties it
equals the default (tests/test_demo.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stanvid.data import RetrievalDataset, make_loader
from stanvid.demo.synth import ClipRecord, Corpus
from stanvid.errors import DatasetError
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.metrics import retrieval_metrics
from stanvid.video.transforms import EvalTransform

__all__ = [
    "TIE_TOLERANCE",
    "Gallery",
    "load_galleries",
    "similarity",
    "evaluate_model",
    "expected_recall",
    "reversal_accuracy",
    "order_blind_chance",
]

# cosine scores this close are the same score computed in another order (float32 rounding is ~1e-7)
TIE_TOLERANCE = 1e-5


@dataclass
class Gallery:
    """One query set and the clips it is ranked against."""

    kind: str  # "appearance" | "order"
    dataset: RetrievalDataset  # evaluation mode, one item per video
    clips: list[ClipRecord]  # aligned with dataset.video_ids
    frame_group: np.ndarray  # (videos,) clips with the same value hold the same frames

    @property
    def text_to_video(self) -> np.ndarray:
        return self.dataset.text_to_video


def load_galleries(corpus: Corpus, context_length: int) -> dict[str, Gallery]:
    """The appearance and order-only test galleries of `corpus`."""
    records = {c.video: c for c in corpus.clips}
    galleries = {}
    for kind, csv in (("appearance", corpus.test_appearance_csv), ("order", corpus.test_order_csv)):
        annotations = corpus.annotations(csv)
        dataset = RetrievalDataset(
            annotations,
            num_frames=corpus.config.num_frames,
            train=False,
            unit="video",
            transform=EvalTransform(corpus.config.image_size),
            context_length=context_length,
        )
        unknown = [v for v in annotations.video_ids if v not in records]
        if unknown:
            raise DatasetError(f"{csv}: video {unknown[0]!r} is not in {corpus.jsonl}")
        clips = [records[v] for v in annotations.video_ids]
        keys = [("order", c.group) if c.kind == "order" else ("clip", c.video) for c in clips]
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        galleries[kind] = Gallery(kind, dataset, clips, np.array([index[k] for k in keys]))
    return galleries


@torch.no_grad()
def similarity(
    model: VideoCLIP, gallery: Gallery, batch_size: int = 64, num_workers: int = 0
) -> torch.Tensor:
    """Cosine similarity of every caption with every clip, ``(texts, videos)``; for a Mug-STAN model
    (``similarity: mug``), the Mug head's scores."""
    model.eval()
    loader = make_loader(gallery.dataset, batch_size=batch_size, num_workers=num_workers)
    if model.config.similarity == "mug":
        from stanvid.models.mug import mug_similarity

        ids = gallery.dataset.text_tokens()  # (Q, L)
        frames = torch.cat([model.encode_video(batch["video"], pool=False) for batch in loader])  # (N, T, D)
        tokens = model.encode_text(ids, pool=False)  # (Q, L, D)
        cfg = model.config
        return mug_similarity(tokens.double(), ids != 0, frames.double(), tau=cfg.mug_tau, mode=cfg.mug_mode)
    videos = torch.cat([model.encode_video(batch["video"]) for batch in loader])  # (N, D)
    texts = model.encode_text(gallery.dataset.text_tokens())  # (Q, D)
    return F.normalize(texts.double(), dim=-1) @ F.normalize(videos.double(), dim=-1).T  # (Q, N)


def evaluate_model(
    model: VideoCLIP, galleries: dict[str, Gallery]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A model on both galleries: ``{"appearance": recalls, "order": recalls, "reversal": %}`` and each
    gallery's similarity matrix ``(texts, videos)``."""
    metrics: dict[str, Any] = {}
    sims = {}
    for kind, gallery in galleries.items():
        sims[kind] = similarity(model, gallery)
        metrics[kind] = expected_recall(sims[kind], gallery.text_to_video)
    metrics["reversal"] = reversal_accuracy(sims["order"], galleries["order"])
    return metrics, sims


def expected_recall(
    sim: torch.Tensor, text_to_video: np.ndarray, ks: Sequence[int] = (1, 5), tolerance: float = TIE_TOLERANCE
) -> dict[str, float]:
    """Text-to-video R@K in percent, averaged over a uniformly random order among tied scores.

    With ``g`` wrong videos scoring above the match and ``e`` tied with it, the match's rank is uniform over
    ``g + 1 .. g + e + 1``, so it is within the first K with probability ``clip((K - g) / (e + 1), 0, 1)``:
    `stanvid.training.metrics.retrieval_metrics` with ``ties="expected"``.
    """
    t2v = retrieval_metrics(
        sim.double(), np.asarray(text_to_video), ties="expected", tie_tolerance=tolerance, ks=ks
    )["t2v"]
    return {f"R@{k}": t2v[f"R{k}"] for k in ks}


def order_blind_chance(gallery: Gallery) -> float:
    """R@1 (%) of a model that ranks perfectly except that it cannot tell clips with the same frames apart."""
    sizes = np.bincount(gallery.frame_group)  # (groups,) clips per frame set
    return float(np.mean(1.0 / sizes[gallery.frame_group[gallery.text_to_video]]) * 100)


def reversal_accuracy(sim: torch.Tensor, gallery: Gallery, tolerance: float = TIE_TOLERANCE) -> float:
    """How often (%) a query scores its clip above the clip's reversal, ties counting one half: frame order
    alone, whatever the model makes of the objects (50 for a model blind to order)."""
    position = {c.video: i for i, c in enumerate(gallery.clips)}
    target = torch.as_tensor(np.asarray(gallery.text_to_video), dtype=torch.long)
    partner = torch.tensor([position[gallery.clips[v].partner] for v in target.tolist()])
    rows = torch.arange(len(target))
    margin = sim[rows, target].double() - sim[rows, partner].double()  # (Q,)
    score = (margin > tolerance).double() + 0.5 * (margin.abs() <= tolerance).double()
    return float(score.mean() * 100)
