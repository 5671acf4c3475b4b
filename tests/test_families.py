"""SigLIP, SigLIP 2 and PE-Core: the shared references (../shared/parity), transformers' `SiglipModel` at other
sizes, save/reload, STAN and the temporal baselines on every family, the rotary table, and the loud errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import stanvid
from stanvid.checkpoints import zoo
from stanvid.checkpoints.siglip import siglip_clip_config
from stanvid.checkpoints.timm_towers import timm_tower_clip_config
from stanvid.errors import ConfigError
from stanvid.models.config import ModelConfig
from stanvid.models.pecore import rope_table

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-4
FOLDERS = ["siglip_hf_a", "siglip2_openclip_a", "pecore_openclip_a"]


def rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = REL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    assert diff <= tol, f"{what}: max relative difference {diff:.3g} > {tol}"


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "math"])
@pytest.mark.parametrize("name", FOLDERS)
def test_reference_folder(parity, name, fused):
    root = parity(name)
    io = load_file(root / "io.safetensors")
    captions = json.loads((root / "meta.json").read_text())["captions"]
    model = stanvid.load_model(root)
    model.set_fused_attention(fused)
    assert model.config.clip.family == ("pecore" if name.startswith("pecore") else "siglip")
    assert torch.equal(model.tokenize(captions), io["input_ids"]), "token ids differ from the reference's"
    with torch.no_grad():
        image = model.encode_image(io["pixel_values"])
        text = model.encode_text(io["input_ids"])
        rel_close(image, io["image_features"], "image_features")
        rel_close(text, io["text_features"], "text_features")
        rel_close(model.logit_scale.reshape(1), io["logit_scale"].reshape(1), "logit_scale")
        if "logit_bias" in io:
            rel_close(model.logit_bias.reshape(1), io["logit_bias"].reshape(1), "logit_bias")
        else:
            assert model.logit_bias is None
        if "logits_per_text" in io:
            rel_close(model.similarity(text, image), io["logits_per_text"], "logits_per_text")
    assert model.config.clip.preprocess.resize_mode == "squash"


def test_reference_preprocessing_read(parity):
    model = stanvid.load_model(parity("pecore_openclip_a"))
    pre = model.config.clip.preprocess
    assert (pre.mean, pre.std, pre.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bilinear")
    assert stanvid.detect_format(parity("siglip_hf_a")) == "hf-siglip"


# ---------------------------------------------------------------------------------------------- transformers
def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(v=(48, 2, 3, 4, 16, 96), t=(48, 2, 6, 12, 80), act="gelu_pytorch_tanh"),
        dict(v=(40, 3, 5, 8, 24, 72), t=(40, 1, 4, 9, 64), act="gelu"),
    ],
    ids=["w48", "w40-gelu"],
)
def test_transformers_siglip_other_sizes(parity, tmp_path, sizes):
    """`SiglipModel` built by transformers at sizes the shared reference does not have, saved as users get it."""
    transformers = pytest.importorskip("transformers")
    ref = parity("siglip_hf_a")
    width, layers, heads, patch, image, mlp = sizes["v"]
    t_width, t_layers, t_heads, context, t_mlp = sizes["t"]
    config = transformers.SiglipConfig(
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           patch_size=patch, image_size=image, intermediate_size=mlp, hidden_act=sizes["act"]),
        text_config=dict(hidden_size=t_width, num_hidden_layers=t_layers, num_attention_heads=t_heads,
                         max_position_embeddings=context, intermediate_size=t_mlp, vocab_size=128,
                         projection_size=width, hidden_act=sizes["act"]),
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.SiglipModel(config).eval()
    _perturb(reference, 1)
    reference.save_pretrained(tmp_path)
    for name in ("spiece.model", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(ref / name, tmp_path / name)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg["size"] = {"height": image, "width": image}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    model = stanvid.load_model(tmp_path)
    pixels = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(2))
    ids = model.tokenize(["A dog runs, fast!", "zwei Katzen"])
    assert ids.shape == (2, context)
    with torch.no_grad():
        want_image = reference.get_image_features(pixel_values=pixels)
        want_text = reference.get_text_features(input_ids=ids)
        want_image = getattr(want_image, "pooler_output", want_image)
        want_text = getattr(want_text, "pooler_output", want_text)
        rel_close(model.encode_image(pixels), want_image, "image_features")
        rel_close(model.encode_text(ids), want_text, "text_features")
        rel_close(model.logit_bias.reshape(1), reference.logit_bias.reshape(1), "logit_bias")


def test_siglip_tokenizer_matches_transformers(parity):
    transformers = pytest.importorskip("transformers")
    root = parity("siglip_hf_a")
    reference = transformers.AutoTokenizer.from_pretrained(root)
    model = stanvid.load_model(root)
    texts = ["Hello,   World!!  ", "</s> a </s>", "<unk>hi", "x <unk> y", "", "\u2581x\u2581y", "a" * 200,
             "UPPER_case--dots...", "don't stop", "日本語のテキスト", "a </s>"]  # fmt: skip
    want = reference(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    assert model.tokenize(texts).tolist() == want


# ---------------------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("name", FOLDERS)
def test_save_reload_bit_identical(parity, tmp_path, name):
    model = stanvid.load_model(parity(name), temporal="stan", stan_depth=2, num_frames=3)
    model.save_pretrained(tmp_path / "saved")
    again = stanvid.load_model(tmp_path / "saved")
    assert again.config.to_dict() == model.config.to_dict()
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.tokenizer.files == model.tokenizer.files
    texts = ["ein Hund läuft über eine Wiese", "A bird lands!"]
    assert torch.equal(again.tokenize(texts), model.tokenize(texts))
    assert stanvid.detect_format(tmp_path / "saved") == "stanvid"


# ---------------------------------------------------------------------------------------------- STAN
@pytest.mark.parametrize("name", FOLDERS)
def test_stan_at_initialisation_is_the_image_model(parity, name):
    model = stanvid.load_model(parity(name), temporal="stan", stan_depth=2, num_frames=3)
    size = model.config.clip.vision.image_size
    video = torch.randn(2, 3, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        frames = model.encode_video(video, pool=False)
        images = model.encode_image(video.flatten(0, 1)).view(2, 3, -1)
    diff = (frames - images).abs().max().item()
    assert diff <= 1e-5, f"STAN at initialisation differs from the image tower by {diff:.3g}"
    assert all(model.is_new_parameter(n) for n, _ in model.named_parameters() if n.startswith("temporal."))
    # gradients reach the branch: first its zero-initialised output projection, then (after a step) the rest
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("temporal.")], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model.encode_video(video).square().sum().backward()
        opt.step()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("temporal.")}
    assert grads["temporal.summary_proj.1.weight"].abs().sum() > 0
    assert grads["temporal.time_embed"].abs().sum() > 0
    assert grads["temporal.layers.0.spatial.attn.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("temporal", ["meanP", "seqTransf"])
@pytest.mark.parametrize("name", FOLDERS)
def test_baselines_on_every_family(parity, name, temporal):
    model = stanvid.load_model(parity(name), temporal=temporal, num_frames=3)
    size = model.config.clip.vision.image_size
    video = torch.randn(1, 3, 3, size, size)
    with torch.no_grad():
        out = model.encode_video(video)
    assert out.shape == (1, model.config.clip.embed_dim) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- rotary table
def _timm_style_rope(grid: int, head_dim: int, ref: int, offset: float) -> torch.Tensor:
    """timm's `build_rotary_pos_embed(in_pixels=False, grid_indexing='xy')` step by step, for a square grid."""
    bands = 1.0 / 10000.0 ** (torch.arange(0, head_dim // 4, 1).float() / (head_dim // 4))
    t = [torch.arange(grid).float() + offset for _ in range(2)]
    t = [x / grid * ref for x in t]
    pos = torch.stack(torch.meshgrid(t, indexing="xy"), dim=-1).unsqueeze(-1) * bands
    sin = pos.sin().reshape(grid * grid, -1).repeat_interleave(2, -1)
    cos = pos.cos().reshape(grid * grid, -1).repeat_interleave(2, -1)
    return torch.cat([sin, cos], -1)


@pytest.mark.parametrize("grid,head_dim,ref,offset", [(14, 64, 14, 1.0), (24, 64, 24, 1.0), (24, 64, 14, 1.0),
                                                      (4, 16, 4, 1.0), (32, 96, 32, 0.0)])  # fmt: skip
def test_rope_table_is_timms(grid, head_dim, ref, offset):
    assert torch.equal(rope_table(grid, head_dim, ref, offset), _timm_style_rope(grid, head_dim, ref, offset))


# ---------------------------------------------------------------------------------------------- full size
_SIGLIP2_B16 = {
    "embed_dim": 768,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 224,
        "timm_model_name": "vit_base_patch16_siglip_224",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        "context_length": 64,
        "vocab_size": 256000,
        "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 768,
        "heads": 12,
        "layers": 12,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
        "act_kwargs": {"approximate": "tanh"},
    },
}  # open_clip's model_configs/ViT-B-16-SigLIP2.json
_PE_B16 = {
    "embed_dim": 1024,
    "vision_cfg": {
        "image_size": 224,
        "timm_model_name": "vit_pe_core_base_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": None,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    "custom_text": True,
}  # open_clip's model_configs/PE-Core-B-16.json
_HF_SIGLIP2_B16 = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "vocab_size": 256000, "max_position_embeddings": 64},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                      "num_hidden_layers": 12, "patch_size": 16, "image_size": 224},
}  # google/siglip2-base-patch16-224's config.json (architecture keys)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("which", ["siglip2-openclip", "siglip2-hf", "pecore"])
def test_full_size_b16_builds_and_runs(which):
    """B/16 of each family from the real configs (random weights): shapes, and SDPA = plain math at 224."""
    if which == "siglip2-hf":
        clip = siglip_clip_config(_HF_SIGLIP2_B16, "config.json")
    else:
        clip = timm_tower_clip_config({"model_cfg": _SIGLIP2_B16 if which != "pecore" else _PE_B16}, "cfg")
    v = clip.vision
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size) == (768, 12, 12, 16, 224)
    if which == "pecore":
        assert (v.class_token, v.rope_ref_grid, v.rope_grid_offset, v.map_heads) == (True, 14, 1.0, 8)
        assert clip.text.context_length == 32 and clip.logit_bias_init is None
    else:
        assert (
            clip.text.context_length == 64
            and clip.text.act == "gelu_tanh"
            and clip.logit_bias_init is not None
        )
    torch.manual_seed(0)
    model = stanvid.VideoCLIP(ModelConfig(clip=clip, temporal="stan", num_frames=2)).eval()
    video = torch.randn(1, 2, 3, 224, 224)
    ids = torch.randint(1, 1000, (1, clip.text.context_length))
    with torch.no_grad():
        fused = model.encode_video(video, pool=False), model.encode_text(ids)
        model.set_fused_attention(False)
        plain = model.encode_video(video, pool=False), model.encode_text(ids)
        images = model.encode_image(video.flatten(0, 1))
    assert fused[0].shape == (1, 2, clip.embed_dim)
    rel_close(fused[0], plain[0], "video (SDPA vs math)")
    rel_close(fused[1], plain[1], "text (SDPA vs math)")
    assert (plain[0][0] - images).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- errors, names
def test_naflex_and_unknown_towers_refused_by_name(parity, tmp_path):
    with pytest.raises(ConfigError, match="siglip2.*NaFlex"):
        siglip_clip_config({"model_type": "siglip2"}, "config.json")
    with pytest.raises(ConfigError, match="naflexvit_base_patch16_siglip"):
        cfg = json.loads(json.dumps(_SIGLIP2_B16))
        cfg["vision_cfg"]["timm_model_name"] = "naflexvit_base_patch16_siglip"
        timm_tower_clip_config({"model_cfg": cfg}, "cfg")
    cfg = json.loads((parity("pecore_openclip_a") / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["timm_model_kwargs"]["swiglu_mlp"] = True
    with pytest.raises(ConfigError, match="timm_model_kwargs.swiglu_mlp"):
        timm_tower_clip_config(cfg, "cfg")
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(parity("siglip_hf_a"), folder)
    (folder / "spiece.model").unlink()
    with pytest.raises(stanvid.CheckpointError, match="no tokenizer"):
        stanvid.load_model(folder)


def test_create_model_knows_the_release_architectures():
    from stanvid.checkpoints.timm_towers import release_clip_config

    assert release_clip_config("ViT-B-16-SigLIP2") == timm_tower_clip_config({"model_cfg": _SIGLIP2_B16}, "x")
    assert release_clip_config("PE-Core-B-16") == timm_tower_clip_config({"model_cfg": _PE_B16}, "x")
    large = release_clip_config("PE-Core-L-14-336").vision
    assert (large.width, large.layers, large.patch_size, large.image_size, large.rope_ref_grid) == (
        1024,
        24,
        14,
        336,
        24,
    )
    with pytest.raises(ConfigError, match="PE-Core-B-16"):
        stanvid.create_model("ViT-X-99")


def test_release_names():
    entry = zoo.lookup("ViT-B-16-SigLIP2/webli")
    assert entry is not None and entry.repo == "timm/ViT-B-16-SigLIP2" and entry.resize_mode == "squash"
    pe = zoo.lookup("PE-Core-B-16/meta")
    assert pe is not None and pe.repo == "timm/PE-Core-B-16" and pe.interpolation == "bilinear"


def test_fresh_model_without_tokenizer_says_so(parity):
    clip = timm_tower_clip_config({"model_cfg": _SIGLIP2_B16}, "cfg")
    clip.text.vocab_size, clip.text.layers, clip.vision.layers = 100, 1, 1
    model = stanvid.VideoCLIP(ModelConfig(clip=clip, temporal="meanP"))
    with pytest.raises(ConfigError, match="no tokenizer"):
        model.tokenize(["a"])
