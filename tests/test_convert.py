"""Checkpoint formats: conversion round trips, loud errors on keys that do not fit, `stanvid convert`."""

from __future__ import annotations

import logging
import shutil
import urllib.error

import pytest
import torch
from safetensors.torch import load_file

import stanvid
from stanvid.cli import main as cli_main
from stanvid.errors import CheckpointError, ConfigError


def sources(parity):
    stan = parity("stan_tiny_a")
    openai = parity("openai_tiny_a")
    c4c = parity("clip4clip_tiny_a")
    return {
        "stan": (stan / "stan_official_layout.pth", {"config": stan / "hf_clip"}, stan / "io.safetensors"),
        "openai_jit": (openai / "openai_jit.pt", {}, openai / "io.safetensors"),
        "openai_sd": (openai / "openai_state_dict.pt", {}, openai / "io.safetensors"),
        "clip4clip": (c4c / "pytorch_model.bin.0", {}, c4c / "io.safetensors"),
        "hf": (stan / "hf_clip", {}, stan / "io.safetensors"),
    }


@pytest.mark.parametrize("name", ["stan", "openai_jit", "openai_sd", "clip4clip", "hf"])
def test_convert_then_reload_is_identical(parity, tmp_path, name):
    src, kwargs, io_path = sources(parity)[name]
    io = load_file(io_path)
    video = io["video"]
    tokens = io["tokens"] if "tokens" in io else io["tokens77"]
    direct = stanvid.load_model(src, **kwargs)
    args = ["convert", str(src), str(tmp_path / "out")]
    if "config" in kwargs:
        args += ["--config", str(kwargs["config"])]
    assert cli_main(args) == 0
    reloaded = stanvid.load_model(tmp_path / "out")
    assert reloaded.config == direct.config
    with torch.no_grad():
        assert torch.equal(reloaded.encode_video(video, pool=False), direct.encode_video(video, pool=False))
        assert torch.equal(reloaded.encode_video(video), direct.encode_video(video))
        assert torch.equal(reloaded.encode_text(tokens), direct.encode_text(tokens))
    assert torch.equal(reloaded.logit_scale, direct.logit_scale)


def test_hf_directory_matches_plain_clip_reference(parity, tmp_path):
    root = parity("stan_tiny_a")
    io = load_file(root / "io.safetensors")
    b, t = io["video"].shape[:2]
    model = stanvid.load_model(root / "hf_clip")
    assert model.config.temporal == "meanP"
    # the same weights as pytorch_model.bin
    (tmp_path / "bin").mkdir()
    shutil.copy(root / "hf_clip" / "config.json", tmp_path / "bin")
    torch.save(load_file(root / "hf_clip" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = stanvid.load_model(tmp_path / "bin")
    with torch.no_grad():
        for m in (model, from_bin):
            emb = m.encode_image(io["video"].flatten(0, 1)).view(b, t, -1)
            assert (emb - io["clip_frame_emb"]).abs().max() <= 1e-4


def write_c4c(tmp_path, sd, name="c4c.bin"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.fixture
def c4c_state(parity):
    return torch.load(parity("clip4clip_tiny_a") / "pytorch_model.bin.0", weights_only=True)


def test_clip4clip_missing_key_is_named(tmp_path, c4c_state):
    del c4c_state["transformerClip.resblocks.1.ln_2.bias"]
    with pytest.raises(CheckpointError, match=r"missing: temporal\.blocks\.1\.ln_2\.bias"):
        stanvid.load_model(write_c4c(tmp_path, c4c_state))


def test_clip4clip_extra_key_is_named(tmp_path, c4c_state):
    c4c_state["transformerClip.resblocks.0.attn.extra_bias"] = torch.zeros(3)
    with pytest.raises(
        CheckpointError, match=r"unmapped key.*transformerClip\.resblocks\.0\.attn\.extra_bias"
    ):
        stanvid.load_model(write_c4c(tmp_path, c4c_state))


def test_clip4clip_misshaped_key_is_named(tmp_path, c4c_state):
    c4c_state["transformerClip.resblocks.0.mlp.c_fc.bias"] = torch.zeros(7)
    with pytest.raises(
        CheckpointError, match=r"mis-shaped: temporal\.blocks\.0\.mlp\.fc1\.bias \(checkpoint \(7,\)"
    ):
        stanvid.load_model(write_c4c(tmp_path, c4c_state))


def test_all_problems_reported_at_once(tmp_path, parity):
    sd = torch.load(parity("stan_tiny_a") / "stan_official_layout.pth", weights_only=True)
    state = sd["state_dict"]
    del state["backbone.post_layernorm.bias"]
    state["backbone.STAN_time_embed.weight"] = torch.zeros(64, 5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        stanvid.load_model(path, config=parity("stan_tiny_a") / "hf_clip")
    assert "missing: visual.ln_post.bias" in str(err.value)
    assert "mis-shaped: temporal.time_embed" in str(err.value)


@pytest.mark.parametrize(
    "key,head",
    [
        ("lstm_visual.weight_ih_l0", "seqLSTM"),
        ("cross.pooler.dense.weight", "tightTransf"),
        ("similarity_dense.weight", "tightTransf"),
    ],
)
def test_clip4clip_unsupported_heads(tmp_path, c4c_state, key, head):
    c4c_state[key] = torch.zeros(4, 4)
    with pytest.raises(CheckpointError, match=head):
        stanvid.load_model(write_c4c(tmp_path, c4c_state))


def test_clip4clip_without_temporal_keys_is_meanp(tmp_path, c4c_state, parity):
    io = load_file(parity("clip4clip_tiny_a") / "io.safetensors")
    plain = {k: v for k, v in c4c_state.items() if k.startswith("clip.")}
    model = stanvid.load_model(write_c4c(tmp_path, plain))
    assert model.config.temporal == "meanP" and model.config.pooling == "normalized_mean"
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_video(io["video"]), dim=-1)
    assert (emb - io["meanP_video_emb"]).abs().max() <= 1e-4


def test_stan_on_clip4clip_finetuned_clip(parity, caplog):
    src = parity("clip4clip_tiny_a") / "pytorch_model.bin.0"
    c4c = stanvid.load_model(src)
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        model = stanvid.load_model(src, temporal="stan", stan_depth=2)
    assert "dropping the checkpoint's seqTransf temporal weights" in caplog.text
    assert model.config.temporal == "stan" and model.config.pooling == "mean"
    for name, value in c4c.visual.state_dict().items():
        assert torch.equal(model.visual.state_dict()[name], value)
    last = model.visual.blocks[-1].state_dict()
    for name, value in model.temporal.layers[-1].spatial.state_dict().items():
        assert torch.equal(value, last[name])


def test_stan_needs_hf_config(parity):
    with pytest.raises(ConfigError, match="config="):
        stanvid.load_model(parity("stan_tiny_a") / "stan_official_layout.pth")


def test_corrupt_and_unknown_files(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises(CheckpointError, match="broken.pt"):
        stanvid.load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        stanvid.load_model(other)
    with pytest.raises(CheckpointError, match="no such file"):
        stanvid.load_model(tmp_path / "nope.pt")


def test_openai_name_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("STANVID_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(CheckpointError) as err:
        stanvid.load_model("ViT-B/32")
    msg = str(err.value)
    assert "ViT-B-32.pt" in msg and str(tmp_path) in msg and "openaipublic" in msg
    assert not list((tmp_path / "openai").glob("*"))  # nothing half-written left behind


def test_hub_id_offline_says_what_to_download(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is an optional extra")

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="openai/clip-vit-base-patch32.*model.safetensors"):
        stanvid.load_model("openai/clip-vit-base-patch32")


def test_hub_id_without_client(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        stanvid.load_model("openai/clip-vit-base-patch32")


def test_cli_convert_refuses_non_empty_destination(parity, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    src = parity("openai_tiny_a") / "openai_jit.pt"
    assert cli_main(["convert", str(src), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "user data"
    assert (
        cli_main(
            ["convert", str(src), str(dst), "--force", "--set", "temporal=stan", "--set", "stan_depth=2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "openai-jit" in out and "stan (selfattn, depth 2)" in out


def test_cli_bad_input_has_no_traceback(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "Traceback" not in err
    assert cli_main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o"), "--set", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
