"""Shared fixtures: where the parity references live, and tiny models built in seconds."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch

from stanvid.config import CLIPConfig, ModelConfig, STANConfig, TextConfig, VisionConfig
from stanvid.model import VideoCLIP


def parity_root() -> Path:
    """`../shared/parity` next to the repository (CI has it there), or $STANVID_PARITY_DIR."""
    env = os.environ.get("STANVID_PARITY_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "parity"


@pytest.fixture
def parity():
    """Path of one parity reference; the test skips, with the reason, when it is absent."""

    def get(name: str) -> Path:
        path = parity_root() / name
        if not path.exists():
            pytest.skip(
                f"parity reference {path} is missing (set STANVID_PARITY_DIR to the shared parity folder)"
            )
        return path

    return get


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


@pytest.fixture
def tiny_model():
    def make(temporal: str = "stan", seed: int = 0, **kw) -> VideoCLIP:
        torch.manual_seed(seed)
        return VideoCLIP(tiny_config(temporal, **kw)).eval()

    return make


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """`stanvid demo --quick --seed 1`, run once per test session (about 20 s): its folder and what it printed.

    Everything that needs a trained STAN model and the demo's corpus (the demo's own end-to-end test, the
    query and zero-shot classification tests) shares this one run."""
    from stanvid.cli import main

    out = tmp_path_factory.mktemp("demo-quick") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--quick", "--out", str(out), "--seed", "1", "--no-progress"])
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()
