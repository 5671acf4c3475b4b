"""Plain helpers the tests share (imported as `from testkit import ...`; `tests/` is on the path through
pyproject's `pythonpath`): the tiny model configuration every fast test builds on, and a free TCP port."""

from __future__ import annotations

import socket

import torch

from stanvid.models.config import CLIPConfig, ModelConfig, STANConfig, TextConfig, VisionConfig
from stanvid.models.video_clip import VideoCLIP


def tiny_config(temporal: str = "stan", **kw) -> ModelConfig:
    """A few-layer CLIP whose sizes differ from every shared reference (nothing may depend on those)."""
    vision = VisionConfig(
        width=48, layers=kw.pop("layers", 3), heads=3, patch_size=8, image_size=kw.pop("image", 24)
    )
    text = TextConfig(width=32, layers=2, heads=2, context_length=16, vocab_size=kw.pop("vocab", 49408))
    stan = STANConfig(
        depth=kw.pop("depth", 2), time_module=kw.pop("time_module", "selfattn"), **kw.pop("stan", {})
    )
    return ModelConfig(
        clip=CLIPConfig(embed_dim=24, vision=vision, text=text),
        temporal=temporal,
        stan=stan,
        num_frames=kw.pop("frames", 5),
        **kw,
    )


def tiny_model(temporal: str = "stan", seed: int = 0, **kw) -> VideoCLIP:
    """A `VideoCLIP` of `tiny_config(temporal, **kw)`, seeded, in eval mode (also the `tiny_model` fixture)."""
    torch.manual_seed(seed)
    return VideoCLIP(tiny_config(temporal, **kw)).eval()


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous or a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
