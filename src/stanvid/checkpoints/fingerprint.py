"""A model's fingerprint: the SHA-256 of its config and weights. Two models with the same fingerprint embed
identically; an index records the fingerprint of the model that built it and refuses any other query model.

It lives with the checkpoints because an ONNX export (`stanvid.checkpoints.export_onnx`) records the
fingerprint of the PyTorch model it came from, and the onnxruntime-backed encoder reports that recorded value
(its graphs are that model's functions), so an index built with one runtime is searched with the other.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from stanvid.models.config import PreprocessConfig

__all__ = ["fingerprinted_config", "model_fingerprint"]


def model_fingerprint(model: Any) -> str:
    """SHA-256 of the model's config and weights (an exported encoder: the fingerprint its export recorded).

    `name` and `grad_checkpointing` are left out: neither changes an output. The frame normalization is left out
    when it is OpenAI's (the only one before configs recorded it), so indexes built then still match.
    """
    recorded = getattr(model, "recorded_fingerprint", None)
    if recorded is not None:
        return recorded
    digest = hashlib.sha256(fingerprinted_config(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not a copy of them
    return digest.hexdigest()


def fingerprinted_config(model: Any) -> str:
    """The part of the config the fingerprint covers, as the JSON it hashes."""
    cfg = model.config.to_dict()
    cfg.pop("name", None)
    cfg.pop("grad_checkpointing", None)
    if model.config.clip.preprocess == PreprocessConfig():
        cfg["clip"].pop("preprocess")
    return json.dumps(cfg, sort_keys=True)
