"""What the SigLIP and PE-Core formats share: the attention-pooling head's keys, reshapes to stanvid's
layout, the tokenizer files beside the weights, and the result every format returns to `load_model`.

A format module (`stanvid.checkpoints.siglip` for Hugging Face `model_type: siglip` folders,
`stanvid.checkpoints.timm_towers` for open_clip folders with a timm image tower) reads a folder once and returns a
`FamilyCheckpoint`: the `CLIPConfig` (family, architecture, preprocessing, tokenizer), the weights under stanvid
keys and the tokenizer's file bytes. `load_model` builds the model from it without asking the folder again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stanvid.checkpoints.convert import read_json
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import CLIPConfig, PreprocessConfig

# the largest tokenizer file read (SigLIP 2's Gemma tokenizer.json is 34 MB, its SentencePiece model 4 MB)
MAX_TOKENIZER_BYTES = 256 << 20


@dataclass
class FamilyCheckpoint:
    """A folder read once: its `CLIPConfig`, its weights under stanvid keys, its tokenizer files."""

    clip: CLIPConfig
    state: dict[str, torch.Tensor]
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)


def read_tokenizer_file(path: Path) -> bytes:
    """A tokenizer file's bytes, bounded (a tokenizer is data: it is parsed, never executed)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the tokenizer file ({exc})") from exc
    if size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(
            f"{path}: {size} bytes is more than a tokenizer file holds ({MAX_TOKENIZER_BYTES})"
        )
    return path.read_bytes()


def read_object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def reshape(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], source: str) -> None:
    """`state[key]` viewed as `shape` (a singleton-batched foreign parameter to ours), or a named error."""
    if key not in state:
        return
    value = state[key]
    if value.numel() != math.prod(shape):
        raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, expected {shape}")
    state[key] = value.reshape(shape).contiguous()


def split_in_proj(state: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """`{prefix}.in_proj.{weight,bias}` (q, k, v rows) -> `{prefix}.q` and `{prefix}.kv` (the MAP head's)."""
    for kind in ("weight", "bias"):
        key = f"{prefix}.in_proj.{kind}"
        if key not in state:
            continue
        value = state.pop(key)
        if value.shape[0] % 3:
            raise CheckpointError(f"{source}: {key} has {value.shape[0]} rows, not three equal parts")
        width = value.shape[0] // 3
        state[f"{prefix}.q.{kind}"] = value[:width].contiguous()
        state[f"{prefix}.kv.{kind}"] = value[width:].contiguous()


def finish_state(state: dict[str, torch.Tensor], clip: CLIPConfig, source: str) -> dict[str, torch.Tensor]:
    """Foreign shapes to stanvid's: scalars for the logit scale and bias, (1, C) probe, (L, C) positions."""
    width = clip.vision.width
    reshape(state, "logit_scale", (), source)
    reshape(state, "logit_bias", (), source)
    reshape(state, "visual.pool.probe", (1, width), source)
    reshape(state, "visual.class_embedding", (width,), source)
    if "visual.pos_embed" in state:
        reshape(state, "visual.pos_embed", (state["visual.pos_embed"].numel() // width, width), source)
    split_in_proj(state, "visual.pool", source)
    return state


def preprocess_from(
    where: str, mean: Any, std: Any, resize_mode: Any = "squash", interpolation: Any = "bicubic"
) -> PreprocessConfig:
    try:
        return PreprocessConfig(mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
