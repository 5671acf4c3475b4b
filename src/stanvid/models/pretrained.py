"""The folder a stanvid model is saved as: ``config.json`` (its `ModelConfig`) and ``model.safetensors``
(float32 weights), each written atomically. `stanvid.checkpoints.load.load_model` reads it back.

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

from stanvid.fileio import atomic_write_bytes, atomic_write_text

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: Any, directory: str | os.PathLike) -> None:
    """`config.json` + `model.safetensors` of a `VideoCLIP`, each written to a temporary file and renamed into
    place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2) + "\n")
