"""Outputs against the reference implementations (../shared/parity): official STAN, OpenAI CLIP, CLIP4Clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import stanvid

TOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"{what}: max abs difference {diff:.3g} > {TOL}"


@pytest.fixture(scope="module", autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "math"])
def test_stan_official(parity, fused):
    root = parity("stan_tiny_a")
    io = load_file(root / "io.safetensors")
    model = stanvid.load_model(root / "stan_official_layout.pth", config=root / "hf_clip")
    model.set_fused_attention(fused)
    assert model.config.temporal == "stan" and model.config.stan.time_module == "selfattn"
    video = io["video"]
    b, t = video.shape[:2]
    close(model.encode_video(video, pool=False), io["frame_emb"], "frame_emb")
    close(model.encode_video(video), io["video_emb"], "video_emb")
    close(model.encode_text(io["tokens"]), io["text_emb"], "text_emb")
    close(model.encode_image(video.flatten(0, 1)).view(b, t, -1), io["clip_frame_emb"], "clip_frame_emb")


@pytest.mark.parametrize("name", ["openai_jit.pt", "openai_state_dict.pt"])
def test_openai_clip(parity, name):
    root = parity("openai_tiny_a")
    io = load_file(root / "io.safetensors")
    model = stanvid.load_model(root / name)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    video = io["video"]
    b, t = video.shape[:2]
    close(model.encode_image(video.flatten(0, 1)).view(b, t, -1), io["image_emb"], "image_emb")
    close(model.encode_text(io["tokens77"]), io["text_emb"], "text_emb")


def test_clip4clip_seqtransf(parity):
    root = parity("clip4clip_tiny_a")
    io = load_file(root / "io.safetensors")
    model = stanvid.load_model(root / "pytorch_model.bin.0")
    assert model.config.temporal == "seqTransf" and model.config.pooling == "normalized_mean"
    video, tokens = io["video"], io["tokens"]
    close(model.encode_video(video, pool=False), io["seq_out"], "seq_out")
    video_emb = model.encode_video(video)
    close(F.normalize(video_emb, dim=-1), io["video_emb"], "video_emb")
    text_emb = model.encode_text(tokens)
    close(text_emb, io["text_emb"], "text_emb")
    close(model.similarity(text_emb, video_emb), io["logits"], "logits")


def test_clip4clip_as_meanp(parity):
    root = parity("clip4clip_tiny_a")
    io = load_file(root / "io.safetensors")
    model = stanvid.load_model(root / "pytorch_model.bin.0", temporal="meanP")
    assert model.config.pooling == "normalized_mean"
    close(F.normalize(model.encode_video(io["video"]), dim=-1), io["meanP_video_emb"], "meanP_video_emb")
    close(model.encode_video(io["video"], pool=False), io["frame_emb"], "frame_emb")
