"""Which model built an index: its fingerprint (config and weights), its source as recorded, and the check
that refuses to mix two models, folders or segmentations in one index."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from stanvid.errors import VideoIndexError
from stanvid.models.config import PreprocessConfig
from stanvid.models.video_clip import VideoCLIP
from stanvid.search.index.store import FORMAT_VERSION


def model_fingerprint(model: VideoCLIP) -> str:
    """SHA-256 of the model's config and weights: two models with the same fingerprint embed identically.

    `name` and `grad_checkpointing` are left out: neither changes an output. The frame normalization is left out
    when it is OpenAI's (the only one before configs recorded it), so indexes built then still match.
    """
    digest = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("name", None)
    cfg.pop("grad_checkpointing", None)
    if model.config.clip.preprocess == PreprocessConfig():
        cfg["clip"].pop("preprocess")
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _source_string(source: str | os.PathLike) -> str:
    """A local checkpoint as its absolute path (so queries work from any directory), anything else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _load_model(source: str, overrides: dict[str, Any]) -> VideoCLIP:
    from stanvid.checkpoints.load import load_model

    return load_model(source, **overrides)


def _check_identity(meta: dict[str, Any], identity: dict[str, Any], out: Path) -> None:
    """Refuse to mix embeddings of two models, two folders or two segmentations in one index."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise VideoIndexError(
            f"{out}: index format {meta.get('format_version')} is not {FORMAT_VERSION}; rebuild it"
        )
    if meta["model_fingerprint"] != identity["model_fingerprint"]:
        raise VideoIndexError(
            f"{out}: the index was built with another model ({meta['model_source'] or 'in-memory model'}, "
            f"fingerprint {meta['model_fingerprint'][:12]}), this one has fingerprint "
            f"{identity['model_fingerprint'][:12]}; use the same model or write a new index (another --out)"
        )
    for key, what in (("root", "folder"), ("segment_seconds", "segment length")):
        if meta[key] != identity[key]:
            raise VideoIndexError(
                f"{out}: the index was built with {what} {meta[key]!r}, not {identity[key]!r}; "
                f"use the same {what} or write a new index (another --out)"
            )
