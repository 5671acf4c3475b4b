"""Evaluation: retrieval R@K / MdR / MnR (plain and dual-softmax), recognition top-1/top-5 over test views.

    metrics = evaluate_retrieval(model, RetrievalDataset(ann, unit="video"))   # {"t2v", "v2t", "dsl": {...}}
    metrics = evaluate_recognition(model, RecognitionDataset(ann, num_crops=3))  # {"top1", "top5"}

Features are computed once per video and per caption; the metrics come from
`stanvid.training.metrics.retrieval_metrics_from_features`, which ranks in chunks of ``chunk_size`` rows, so a 100k x
100k evaluation never holds the whole similarity matrix. The dual-softmax (DSL) numbers are reported beside
the plain ones, never instead of them (the paper reports them separately). Recognition averages the test
views' softmax scores (mmaction2's ``average_clips='prob'``) or raw scores.

Under torchrun every rank encodes its share of the videos and texts (``rank::world``, no padding, so no
duplicates) and the features are gathered before ranking; every rank returns the same metrics.

`zero_shot_model` gives the baseline row: the plain CLIP of a recipe's source, frames mean-pooled.
`write_results` writes a run's metrics as JSON and a readable table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from stanvid.data.base import format_skipped
from stanvid.data.loader import build_loader
from stanvid.distributed import rank_world
from stanvid.errors import ConfigError, DatasetError
from stanvid.fileio import atomic_write_text
from stanvid.models.heads import eval_mode
from stanvid.precision import prepare_for_inference
from stanvid.training.losses import text_classifier_logits
from stanvid.training.metrics import (
    average_views,
    format_table,
    retrieval_metrics,
    retrieval_metrics_from_features,
    topk_accuracy,
)

__all__ = [
    "evaluate_retrieval",
    "evaluate_recognition",
    "encode_videos",
    "encode_texts",
    "mug_scores",
    "zero_shot_model",
    "write_results",
]


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _gather_rows(local: torch.Tensor, indices: list[int], total: int) -> torch.Tensor:
    """Rows computed on each rank for its ``indices``, assembled in index order on every rank."""
    rank, world = rank_world()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (indices, local.cpu()))
    filled = [(idx, rows) for idx, rows in parts if idx]
    if not filled:
        return local
    template = filled[0][1]
    out = template.new_empty((total, *template.shape[1:]))
    for idx, rows in filled:
        out[torch.tensor(idx)] = rows
    return out


def _shard(n: int) -> list[int]:
    rank, world = rank_world()
    return list(range(rank, n, world))


def _map_dataset(
    dataset: Dataset,
    fn: Callable[[dict[str, Any]], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """``fn`` over this rank's share of the dataset in batches, gathered: ``(len(dataset), ...)`` in order."""
    rank, _ = rank_world()
    indices = _shard(len(dataset))
    # in order, one pass (no workers kept), this rank's share already chosen (no DistributedSampler)
    loader = build_loader(
        Subset(dataset, indices),
        batch_size,
        num_workers=num_workers,
        pin_memory=False,
        persistent_workers=False,
    )
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    outputs = []
    try:
        for batch in loader:
            skipped = batch.pop("skipped", [])
            if skipped:
                raise DatasetError(
                    f"evaluation cannot leave videos out (the metrics would change):\n{format_skipped(skipped)}"
                )
            outputs.append(fn(batch).float().cpu())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    local = torch.cat(outputs) if outputs else torch.empty(0)  # a rank may have no items (fewer than ranks)
    return _gather_rows(local, indices, len(dataset))


@torch.inference_mode()
def encode_videos(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: bool = False,
    pool: bool = True,
) -> torch.Tensor:
    """``(len(dataset), D)`` float32 video embeddings (unnormalized), item ``i`` in row ``i``; per-frame
    ``(len(dataset), T, D)`` with ``pool=False`` (for the Mug head).

    Items with several test views (``video`` ``(V, T, 3, S, S)``) give ``(len(dataset), V, D)``.
    ``precision`` is any of `stanvid.precision.PRECISIONS` (``auto``: bf16 where the hardware has it).
    """
    device = _device(model, device)
    runner = prepare_for_inference(model, precision, device)

    def encode(batch: dict[str, Any]) -> torch.Tensor:
        video = batch["video"].to(device, non_blocking=True)
        with runner.autocast():
            if video.dim() == 6:  # (B, V, T, 3, S, S): test views
                b, v = video.shape[:2]
                out = runner.model.encode_video(video.flatten(0, 1), pool=pool)  # (B*V, D) or (B*V, T, D)
                return out.view(b, v, *out.shape[1:])  # (B, V, D) or (B, V, T, D)
            return runner.model.encode_video(video, pool=pool)  # (B, D) or (B, T, D)

    return _map_dataset(
        dataset, encode, batch_size=batch_size, num_workers=num_workers, progress=progress, desc="videos"
    )


@torch.inference_mode()
def encode_texts(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    pool: bool = True,
) -> torch.Tensor:
    """``(N, D)`` float32 text embeddings of token ids ``(N, L)`` (this rank's share, gathered); per-token
    ``(N, L, D)`` with ``pool=False`` (for the Mug head)."""
    device = _device(model, device)
    runner = prepare_for_inference(model, precision, device)
    indices = _shard(len(tokens))
    mine = tokens[indices] if indices else tokens[:0]
    parts = []
    for start in range(0, len(mine), batch_size):
        with runner.autocast():
            ids = mine[start : start + batch_size].to(device)
            parts.append(runner.model.encode_text(ids, pool=pool).float().cpu())
    local = torch.cat(parts) if parts else torch.empty(0)
    return _gather_rows(local, indices, len(tokens))


def evaluate_retrieval(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    dsl: bool = True,
    dsl_temperature: float = 0.01,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: bool = False,
    mug_chunk: int | None = None,
) -> dict[str, Any]:
    """Text-to-video and video-to-text retrieval metrics of ``model`` on a test split.

    Args:
        dataset: one item per video (`stanvid.RetrievalDataset` with ``unit="video"``); the queries are
            ``dataset.text_tokens()`` and ``dataset.text_to_video`` says which video each caption describes
            (several captions per video, as MSVD: each caption is a query; a video's v2t rank is the best rank
            of any of its captions).
        dsl: add the dual-softmax re-ranked metrics under ``"dsl"`` at ``dsl_temperature`` (cosine units).
        chunk_size: rows of the similarity ranked at once (bounds memory, not the result).
        precision: ``fp32`` (the reference), ``bf16``/``fp16`` (autocast), ``int8`` (CPU), or ``auto``
            (`stanvid.precision.resolve_precision`); embeddings are ranked in float32 whatever it is.
        mug_chunk: for a model with the Mug head (``model.config.similarity == "mug"``), captions x videos
            scored per block (`stanvid.models.mug.mug_similarity`); default: blocks of about 64 MB of cosines.

    A Mug-STAN model is scored by its head over all pairs, from per-token text and per-frame video features,
    block by block on the model's device, so the ``(texts, videos, tokens, frames)`` cosines never exist at once.

    Returns:
        ``{"t2v": {"R1", "R5", "R10", "MdR", "MnR"}, "v2t": {...}, "dsl": {"t2v": ..., "v2t": ...}}``.
    """
    if getattr(dataset, "unit", "video") != "video" or not hasattr(dataset, "text_tokens"):
        raise ConfigError(
            "evaluate_retrieval needs one item per video with the captions as queries: "
            "RetrievalDataset(..., unit='video', train=False)"
        )
    mug = getattr(getattr(model, "config", None), "similarity", "cosine") == "mug"
    with eval_mode(model):
        videos = encode_videos(
            model,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            progress=progress,
            pool=not mug,
        )  # (M, D), or (M, T, D) for the Mug head
        tokens = dataset.text_tokens()
        texts = encode_texts(
            model, tokens, device=device, precision=precision, pool=not mug
        )  # (N, D) / (N, L, D)
    ids = torch.as_tensor(dataset.text_to_video)
    if mug:
        sim = mug_scores(model, texts, tokens != 0, videos, chunk=mug_chunk, device=_device(model, device))
        metrics = retrieval_metrics(sim, ids, chunk=chunk_size)
        if dsl:
            metrics["dsl"] = retrieval_metrics(sim, ids, chunk=chunk_size, dsl_temperature=dsl_temperature)
        return metrics
    metrics: dict[str, Any] = retrieval_metrics_from_features(texts, videos, ids, chunk=chunk_size)
    if dsl:
        metrics["dsl"] = retrieval_metrics_from_features(
            texts, videos, ids, chunk=chunk_size, dsl_temperature=dsl_temperature
        )
    return metrics


@torch.inference_mode()
def mug_scores(
    model: nn.Module,
    token_emb: torch.Tensor,
    text_mask: torch.Tensor,
    frame_emb: torch.Tensor,
    *,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(N, M)`` float32 Mug head scores (on the CPU) of per-token texts ``(N, L, D)`` against per-frame videos
    ``(M, T, D)``, with the model's head mode and temperature, computed block by block on ``device``."""
    from stanvid.models.mug import mug_block_size, mug_similarity

    cfg = model.config
    device = torch.device(device) if device is not None else torch.device("cpu")
    if chunk is None:
        chunk = mug_block_size(token_emb.shape[1], frame_emb.shape[1])
    sim = torch.empty(token_emb.shape[0], frame_emb.shape[0])
    frames = frame_emb.to(device)
    rows = max(chunk, 1)
    for start in range(0, token_emb.shape[0], rows):  # one row band at a time on the device
        band = slice(start, start + rows)
        sim[band] = mug_similarity(
            token_emb[band].to(device),
            text_mask[band].to(device),
            frames,
            tau=cfg.mug_tau,
            mode=cfg.mug_mode,
            chunk=chunk,
        ).cpu()
    return sim


def evaluate_recognition(
    model: nn.Module,
    dataset: Dataset,
    *,
    class_names: Sequence[str] | None = None,
    class_features: torch.Tensor | None = None,
    head: nn.Module | None = None,
    logit_scale: float | None = None,
    text_length: int = 32,
    view_average: str = "prob",
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``model`` on a labelled test split, test views averaged.

    The classifier is ``head`` (a linear head on the video embedding, as `stanvid.models.heads.LinearHead`) when given;
    otherwise the cosine to the class names' text embeddings (``class_features``, or ``class_names`` encoded
    with ``text_length`` tokens, default ``dataset.annotations.classes``) times ``logit_scale`` (default the
    model's ``exp(logit_scale)``). Items may carry several views (``(V, T, 3, S, S)``); their scores are averaged
    per ``view_average`` (``prob``: softmax probabilities, ``score``: raw scores) before ranking.
    """
    from stanvid.models.heads import encode_class_names

    device = _device(model, device)
    with eval_mode(model):
        if head is None and class_features is None:
            if class_names is None:
                class_names = getattr(getattr(dataset, "annotations", None), "classes", None)
            if not class_names:
                raise ConfigError("evaluate_recognition needs class_names, class_features or a head")
            class_features = encode_class_names(model, class_names, text_length, device)
        scale = float(model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale)
        feats = encode_videos(
            model,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            progress=progress,
        )  # (N, D) or (N, V, D)
    views = feats.shape[1] if feats.dim() == 3 else 1
    flat = feats.reshape(-1, feats.shape[-1])  # (N * V, D), views of a video contiguous
    with torch.inference_mode():
        if head is not None:
            head_device = next(head.parameters()).device
            logits = head(flat.to(head_device)).float().cpu()  # (N * V, K)
        else:
            logits = text_classifier_logits(flat, class_features.float().cpu(), scale)  # (N * V, K)
    scores = average_views(logits, views, view_average)  # (N, K)
    labels = _labels(dataset)
    ks = (1, 5) if scores.shape[1] >= 5 else (1,)
    return topk_accuracy(scores, labels, ks=ks)


def _labels(dataset: Dataset) -> torch.Tensor:
    annotations = getattr(dataset, "annotations", None)
    if annotations is not None and hasattr(annotations, "labels"):
        return torch.as_tensor(annotations.labels).long()
    return torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))])


def zero_shot_model(source: str | os.PathLike, num_frames: int, **load_args: Any) -> nn.Module:
    """The plain CLIP of ``source`` (any `stanvid.load_model` source) with mean-pooled frames: the baseline row.

    A temporal module stored in the checkpoint is dropped; nothing is trained.
    """
    from stanvid.checkpoints.load import load_model

    return load_model(source, temporal="meanP", num_frames=num_frames, **load_args)


def write_results(
    results: Mapping[str, Any], out_dir: str | os.PathLike, name: str = "eval"
) -> tuple[Path, str]:
    """Write ``results`` to ``out_dir/{name}.json`` and the table of ``results["metrics"]`` (or of ``results``)
    to ``out_dir/{name}.txt``; returns the JSON path and the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = results.get("metrics", results)
    table = format_table(metrics)
    json_path = out / f"{name}.json"
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / f"{name}.txt", table + "\n")
    return json_path, table
