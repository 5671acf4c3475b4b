"""Mug-STAN's head (stanvid.models.mug): parity with the official `Mug_head`, chunking, the loss, config and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import stanvid
from mugkit import mug_reference
from stanvid.errors import ConfigError
from stanvid.models.config import MUG_MODES, ModelConfig
from stanvid.models.mug import mug_similarity
from stanvid.training.losses import mug_contrastive_loss

TOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"{what}: max abs difference {diff:.3g} > {TOL}"


@torch.no_grad()
def test_token_features_official(parity):
    root = parity("mugstan_tiny_a")
    io = load_file(root / "io.safetensors")
    model = stanvid.load_model(root / "hf_clip")
    tokens = model.encode_text(io["ids"], pool=False)
    close(tokens, io["token_emb"], "token_emb")
    close(model.encode_text(io["ids"]), io["text_emb"], "text_emb")
    close(io["mask"].long(), (io["ids"] != 0).long(), "mask")


@pytest.mark.parametrize("mode", MUG_MODES)
def test_head_official(parity, mode):
    io = load_file(parity("mugstan_tiny_a") / "io.safetensors")
    expected = io[f"logits_{mode}"]
    got = mug_similarity(io["token_emb"], io["mask"], io["frame_emb"], tau=100.0, mode=mode)
    close(got, expected, f"logits_{mode}")
    # block by block gives the same scores
    close(
        mug_similarity(io["token_emb"], io["mask"], io["frame_emb"], mode=mode, chunk=2), expected, "chunked"
    )


def _random_inputs(n=7, b=5, length=9, frames=4, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, dim, generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    lengths[0] = length  # one caption fills the context (no padding at all)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    frames_ = torch.randn(b, frames, dim, generator=g)
    return tokens, mask, frames_


@pytest.mark.parametrize("mode", MUG_MODES)
@pytest.mark.parametrize("tau", [100.0, 7.0])
def test_head_matches_4d_reference_and_chunks(mode, tau):
    tokens, mask, frames = _random_inputs()
    full = mug_similarity(tokens, mask, frames, tau=tau, mode=mode)
    close(full, mug_reference(tokens, mask, frames, tau, mode), "4-D reference")
    for chunk in (1, 3, 100):
        close(mug_similarity(tokens, mask, frames, tau=tau, mode=mode, chunk=chunk), full, f"chunk {chunk}")


def test_head_rejects_bad_input():
    tokens, mask, frames = _random_inputs()
    with pytest.raises(ValueError, match="drl_wti"):
        mug_similarity(tokens, mask, frames, mode="drl_wti")
    with pytest.raises(ValueError, match="text_mask"):
        mug_similarity(tokens, mask[:, :-1], frames)
    with pytest.raises(ValueError, match="same width"):
        mug_similarity(tokens, mask, frames[..., :-1])
    with pytest.raises(ValueError, match="tau"):
        mug_similarity(tokens, mask, frames, tau=0)
    with pytest.raises(ValueError, match="chunk"):
        mug_similarity(tokens, mask, frames, chunk=0)


def test_loss_matches_hand_written_reference():
    tokens, mask, frames = _random_inputs(n=4, b=4)
    tokens.requires_grad_(True)
    frames.requires_grad_(True)
    loss = mug_contrastive_loss(frames, tokens, mask, 100.0, tau=100.0, mode="mug_frame_token_simple")
    # NormSoftmaxLoss of the official code: logits * scale, -mean(diag log_softmax rows) - same for columns
    x = mug_reference(tokens, mask, frames, 100.0, "mug_frame_token_simple") * 100.0
    expected = -torch.diag(F.log_softmax(x, 1)).mean() - torch.diag(F.log_softmax(x.t(), 1)).mean()
    close(loss, expected, "loss")
    g1 = torch.autograd.grad(loss, (tokens, frames))
    g2 = torch.autograd.grad(expected, (tokens, frames))
    for a, b_ in zip(g1, g2, strict=True):
        assert torch.isfinite(a).all()
        close(a, b_, "gradient")


def test_config_validates_and_round_trips(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="similarity"):
        ModelConfig(similarity="dot")
    with pytest.raises(ConfigError, match="mug_mode"):
        ModelConfig(mug_mode="drl_wti")
    with pytest.raises(ConfigError, match="mug_tau"):
        ModelConfig(mug_tau=-1)
    model = tiny_model(similarity="mug", mug_mode="mug_frame_token", mug_tau=50.0)
    model.save_pretrained(tmp_path / "m")
    back = stanvid.load_model(tmp_path / "m")
    assert (back.config.similarity, back.config.mug_mode, back.config.mug_tau) == (
        "mug",
        "mug_frame_token",
        50.0,
    )
    assert stanvid.load_model(tmp_path / "m", similarity="cosine").config.similarity == "cosine"


# ---- released Mug-STAN checkpoints: STAN's layout, the head recorded in the config ---------------------------

MUG_CFG = "model = dict(\n    type='CLIPSimilarity_split',\n    tau = 0.01,\n    adapter=dict(type=\"Mug_head\", input_dim = 512, tau = 100))\n"


def _official_checkpoint(root, tmp_path, meta_cfg=None, extra=None):
    obj = torch.load(root / "stan_official_layout.pth", weights_only=True)
    if meta_cfg is not None:
        obj["meta"] = {"cfg": meta_cfg}
    obj["state_dict"].update(extra or {})
    path = tmp_path / "mugstan.pth"
    torch.save(obj, path)
    return path


@torch.no_grad()
def test_official_mugstan_checkpoint_loads_with_its_head(parity, tmp_path):
    root = parity("stan_tiny_a")
    io = load_file(root / "io.safetensors")
    path = _official_checkpoint(root, tmp_path, MUG_CFG)
    model = stanvid.load_model(path, config=root / "hf_clip")
    cfg = model.config
    assert (cfg.temporal, cfg.similarity, cfg.mug_mode, cfg.mug_tau) == (
        "stan",
        "mug",
        "mug_frame_token_simple",
        100.0,
    )
    frames = model.encode_video(io["video"], pool=False)
    close(frames, io["frame_emb"], "frame_emb")  # the backbone is STAN's, key for key
    model.save_pretrained(tmp_path / "saved")
    back = stanvid.load_model(tmp_path / "saved")
    assert (back.config.similarity, back.config.mug_mode, back.config.mug_tau) == (
        "mug",
        "mug_frame_token_simple",
        100.0,
    )
    # a mode written in the stored config is taken; an explicit override wins over it
    moded = MUG_CFG.replace("input_dim", "mode='mug_frame_text', input_dim")
    path = _official_checkpoint(root, tmp_path, moded)
    assert stanvid.load_model(path, config=root / "hf_clip").config.mug_mode == "mug_frame_text"
    over = stanvid.load_model(path, config=root / "hf_clip", mug_mode="mug_frame_token")
    assert over.config.mug_mode == "mug_frame_token"


def test_official_checkpoint_without_a_head_record(parity, tmp_path):
    root = parity("stan_tiny_a")
    plain = _official_checkpoint(root, tmp_path, "model = dict(adapter=None)\n")
    assert stanvid.load_model(plain, config=root / "hf_clip").config.similarity == "cosine"
    assert stanvid.load_model(plain, config=root / "hf_clip", similarity="mug").config.similarity == "mug"
    drl = _official_checkpoint(root, tmp_path, MUG_CFG.replace("input_dim", "mode='drl_wti', input_dim"))
    with pytest.raises(ConfigError, match="mug_mode"):
        stanvid.load_model(drl, config=root / "hf_clip")
    weights = {
        "adapter.text_weight_fc.weight": torch.zeros(1, 48),
        "adapter.text_weight_fc.bias": torch.zeros(1),
    }
    with pytest.raises(stanvid.CheckpointError, match="drl_wti"):
        stanvid.load_model(_official_checkpoint(root, tmp_path, MUG_CFG, weights), config=root / "hf_clip")
