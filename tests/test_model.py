"""The model against second paths: fused vs math attention, checkpointing vs not, save/load, initialisation."""

from __future__ import annotations

import pytest
import torch

import stanvid
from stanvid.errors import ConfigError
from stanvid.models.config import ModelConfig


def video_batch(model, b=2, t=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.config.clip.vision.image_size
    t = t or model.config.num_frames
    return torch.randn(b, t, 3, size, size, generator=g)


def text_batch(model, n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    length = model.config.clip.text.context_length
    ids = torch.randint(1, 1000, (n, length), generator=g)
    ids[:, 0] = 49406
    ids[torch.arange(n), torch.tensor([5, 9, length - 1])[:n]] = 49407
    return ids


def randomize_temporal(model):
    """Give the temporal module non-zero weights (fresh ones have zero output projections)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("temporal."):
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(
    "temporal,time_module",
    [("stan", "selfattn"), ("stan", "conv"), ("seqTransf", "selfattn"), ("meanP", "selfattn")],
)
def test_fused_attention_matches_math(tiny_model, temporal, time_module):
    model = tiny_model(temporal, time_module=time_module)
    randomize_temporal(model)
    video, ids = video_batch(model), text_batch(model)
    with torch.no_grad():
        fused = model.encode_video(video, pool=False), model.encode_text(ids)
        model.set_fused_attention(False)
        math = model.encode_video(video, pool=False), model.encode_text(ids)
    for a, b in zip(fused, math, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "temporal,time_module", [("stan", "selfattn"), ("stan", "conv"), ("seqTransf", "selfattn")]
)
def test_gradient_checkpointing_same_outputs_and_grads(tiny_model, temporal, time_module):
    model = tiny_model(temporal, time_module=time_module).train()
    for m in model.modules():  # drop-path is random; checkpointing must not change anything else
        if hasattr(m, "rate"):
            m.rate = 0.0
    randomize_temporal(model)
    video, ids = video_batch(model), text_batch(model)

    def run():
        model.zero_grad()
        out = model.encode_video(video)
        loss = out.square().sum() + model.encode_text(ids).square().sum()
        loss.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_out, plain_grads = run()
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    torch.testing.assert_close(ckpt_out, plain_out, atol=0, rtol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_paper_initialisation(tiny_model):
    model = tiny_model("stan", depth=2, layers=3)
    branch = model.temporal
    start = len(model.visual.blocks) - branch.depth
    for k, layer in enumerate(branch.layers):
        clip_block = model.visual.blocks[start + k]
        for name, value in clip_block.state_dict().items():
            torch.testing.assert_close(layer.spatial.state_dict()[name], value, atol=0, rtol=0)
        assert (
            torch.count_nonzero(layer.temporal.fc.weight) == 0
            and torch.count_nonzero(layer.temporal.fc.bias) == 0
        )


def test_fresh_conv_and_selfattn_branches_agree(tiny_model):
    """Both temporal modules start as identity (zero output projection), so a fresh branch is the same function."""
    attn = tiny_model("stan", time_module="selfattn", seed=3)
    conv = tiny_model("stan", time_module="conv", seed=3)
    shared = {
        k: v for k, v in attn.state_dict().items() if ".temporal.attn." not in k and ".temporal.ln." not in k
    }
    conv.load_state_dict(shared, strict=False)
    video = video_batch(attn)
    with torch.no_grad():
        torch.testing.assert_close(conv.encode_video(video), attn.encode_video(video), atol=1e-6, rtol=1e-6)


def test_temporal_path_sees_frame_order(tiny_model):
    """STAN and seqTransf outputs change when frames are reversed; meanP's pooled output does not."""
    video = None
    for temporal in ("stan", "seqTransf", "meanP"):
        model = tiny_model(temporal, time_module="selfattn")
        randomize_temporal(model)
        video = video_batch(model) if video is None else video
        with torch.no_grad():
            fwd, rev = model.encode_video(video), model.encode_video(video.flip(1))
        if temporal == "meanP":
            torch.testing.assert_close(fwd, rev, atol=1e-5, rtol=1e-5)
        else:
            assert (fwd - rev).abs().max() > 1e-3, temporal


@pytest.mark.parametrize("frames", [1, 3, 7])
def test_any_frame_count_and_pool(tiny_model, frames):
    model = tiny_model("stan")
    randomize_temporal(model)
    video = video_batch(model, b=2, t=frames)
    with torch.no_grad():
        per_frame = model.encode_video(video, pool=False)
        pooled = model.encode_video(video)
    assert per_frame.shape == (2, frames, 24)
    torch.testing.assert_close(pooled, per_frame.mean(1))


def test_encode_image_is_plain_clip(tiny_model):
    stan, meanp = tiny_model("stan", seed=5), tiny_model("meanP", seed=5)
    meanp.load_state_dict({k: v for k, v in stan.state_dict().items() if not k.startswith("temporal.")})
    images = video_batch(stan)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(stan.encode_image(images), meanp.encode_image(images), atol=0, rtol=0)
        torch.testing.assert_close(
            meanp.encode_video(images[:, None], pool=False)[:, 0], meanp.encode_image(images)
        )


@pytest.mark.parametrize(
    "temporal,extra",
    [("stan", {"time_module": "conv"}), ("seqTransf", {}), ("meanP", {"pooling": "normalized_mean"})],
)
def test_save_pretrained_round_trip_is_exact(tiny_model, tmp_path, temporal, extra):
    model = tiny_model(temporal, **extra)
    randomize_temporal(model)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = stanvid.load_model(tmp_path / "m")
    assert loaded.config == model.config
    video, ids = video_batch(model), text_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded.encode_video(video), model.encode_video(video))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))


def test_create_model_by_name():
    model = stanvid.create_model("ViT-B/32", temporal="stan", stan_depth=4, num_frames=12)
    cfg = model.config
    assert (cfg.clip.vision.width, cfg.clip.vision.layers, cfg.clip.vision.patch_size) == (768, 12, 32)
    assert cfg.stan.depth == 4 and cfg.num_frames == 12 and len(model.temporal.layers) == 4
    with pytest.raises(ConfigError, match="ViT-H/99"):
        stanvid.create_model("ViT-H/99")


@pytest.mark.parametrize(
    "data,field",
    [
        ({"temporal": "lstm"}, "temporal"),
        ({"stan": {"depth": 0}}, "depth"),
        ({"stan": {"time_module": "tconv"}}, "time_module"),
        ({"stan": {"kernel_size": [2, 1, 1]}}, "kernel_size"),
        ({"clip": {"vision": {"width": 50, "heads": 4}}}, "width"),
        ({"clip": {"vision": {"act": "relu"}}}, "act"),
        ({"num_frames": 100}, "num_frames"),
        ({"pooling": "max"}, "pooling"),
        ({"temporl": "stan"}, "temporl"),
    ],
)
def test_bad_config_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(data)


def test_override_validation():
    cfg = ModelConfig()
    assert cfg.replace(stan_depth=2, time_module="conv").stan.depth == 2
    with pytest.raises(ConfigError, match="stan_dpeth"):
        cfg.replace(stan_dpeth=2)


def test_bad_input_shapes(tiny_model):
    model = tiny_model("stan")
    with pytest.raises(ValueError, match="B, T, 3, H, W"):
        model.encode_video(torch.zeros(2, 3, 24, 24))
    with pytest.raises(ValueError, match="24x24"):
        model.encode_video(torch.zeros(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.zeros(1, 40, dtype=torch.long))
