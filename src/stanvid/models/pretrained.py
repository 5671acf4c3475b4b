"""The folder a stanvid model is saved as: ``config.json`` (its `ModelConfig`), ``model.safetensors``
(float32 weights) and the tokenizer's file when the model has one of its own (SigLIP's ``spiece.model``, a
``tokenizer.json``: `ModelConfig.clip.tokenizer.file`), each written atomically. `stanvid.checkpoints.load.load_model`
reads it back.

It lives below the model (it needs only ``model.config`` and ``model.state_dict()``), so `VideoCLIP`'s own
`save_pretrained` and the loaders in `stanvid.checkpoints.load` share it without importing each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from stanvid.errors import ConfigError
from stanvid.fileio import atomic_write_bytes, atomic_write_text

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained", "read_tokenizer_files"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: Any, directory: str | os.PathLike) -> None:
    """`config.json` + `model.safetensors` of a `VideoCLIP`, each written to a temporary file and renamed into
    place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
    for name, data in getattr(model.tokenizer, "files", {}).items():
        atomic_write_bytes(directory / name, data)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2) + "\n")


def read_tokenizer_files(directory: str | os.PathLike, config: Any) -> dict[str, bytes]:
    """The tokenizer file a saved model's config names, read from its folder (none for CLIP's BPE)."""
    name = config.clip.tokenizer.file
    if config.clip.tokenizer.kind == "clip" or not name:
        return {}
    path = Path(directory) / name
    if not path.is_file():
        raise ConfigError(f"{path}: the model's tokenizer file is missing (config.json names it)")
    return {name: path.read_bytes()}
