"""open_clip's model zoo: hub-layout folders, plain OpenAI-layout files with overrides, scripted archives,
pretrained names and `hf-hub:` ids through the (faked, local) hub, and config options refused by name."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import stanvid
from stanvid.checkpoints import zoo
from stanvid.checkpoints.convert import open_clip_config
from stanvid.checkpoints.download import TOKENIZER_FILES
from stanvid.cli import main as cli_main
from stanvid.errors import CheckpointError, ConfigError

TOL = 1e-4
REF = "openclip_tiny_a"
HEADS = {"act": "gelu", "vision_heads": 4, "text_heads": 3}  # what the reference's README says its model has


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"{what}: max abs difference {diff:.3g} > {TOL}"


def check_reference(model: stanvid.VideoCLIP, root: Path) -> None:
    io = load_file(root / "io.safetensors")
    with torch.no_grad():
        close(model.encode_image(io["images"]), io["image_emb"], "image_emb")
        close(model.encode_text(io["ids"]), io["text_emb"], "text_emb")
        close(model.logit_scale.reshape(1), io["logit_scale"].reshape(1), "logit_scale")


def outputs(model: stanvid.VideoCLIP, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    io = load_file(root / "io.safetensors")
    with torch.no_grad():
        return model.encode_image(io["images"]), model.encode_text(io["ids"])


def reference_state(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "open_clip_model.safetensors")


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "math"])
def test_open_clip_folder_matches_reference(parity, fused):
    root = parity(REF)
    model = stanvid.load_model(root)
    model.set_fused_attention(fused)
    assert stanvid.detect_format(root) == "open_clip"
    cfg = json.loads((root / "open_clip_config.json").read_text())
    clip = model.config.clip
    assert clip.vision.act == clip.text.act == "gelu"  # no quick_gelu key: open_clip's exact GELU
    v, t = cfg["model_cfg"]["vision_cfg"], cfg["model_cfg"]["text_cfg"]
    assert clip.vision.heads == v["width"] // v["head_width"] and clip.text.heads == t["heads"]
    assert list(clip.preprocess.mean) == cfg["preprocess_cfg"]["mean"]
    assert list(clip.preprocess.std) == cfg["preprocess_cfg"]["std"]
    check_reference(model, root)


def test_weights_file_beside_its_config_uses_it(parity):
    root = parity(REF)
    check_reference(stanvid.load_model(root / "open_clip_model.safetensors"), root)


def test_plain_openai_layout_file_needs_act_and_heads(parity, tmp_path, caplog):
    """The same weights as a plain state dict: nothing in it says GELU or 32-wide heads."""
    root = parity(REF)
    plain = tmp_path / "laion_b32.bin"
    torch.save(reference_state(root), plain)
    check_reference(stanvid.load_model(plain, **HEADS), root)
    check_reference(stanvid.load_model(plain, config=root / "open_clip_config.json"), root)
    check_reference(stanvid.load_model(plain, config=root), root)
    with caplog.at_level(logging.WARNING, logger="stanvid"):
        assumed = stanvid.load_model(plain)
    assert "does not record its activation" in caplog.text and "act='gelu'" in caplog.text
    assert assumed.config.clip.vision.act == "quick_gelu"
    image, _ = outputs(assumed, root)
    assert (image - load_file(root / "io.safetensors")["image_emb"]).abs().max() > 1e-2  # why it warns


def test_set_overrides_through_the_cli(parity, tmp_path):
    root = parity(REF)
    plain = tmp_path / "w.pt"
    torch.save(reference_state(root), plain)
    sets = [a for k, v in HEADS.items() for a in ("--set", f"{k}={v}")]
    assert cli_main(["convert", str(plain), str(tmp_path / "out"), *sets]) == 0
    reloaded = stanvid.load_model(tmp_path / "out")
    assert reloaded.config.clip.vision.act == "gelu" and reloaded.config.clip.vision.heads == 4
    check_reference(reloaded, root)


def test_convert_of_open_clip_folder_reloads_identically(parity, tmp_path, capsys):
    root = parity(REF)
    direct = stanvid.load_model(root)
    assert cli_main(["convert", str(root), str(tmp_path / "out")]) == 0
    assert "open_clip" in capsys.readouterr().out
    reloaded = stanvid.load_model(tmp_path / "out")
    assert reloaded.config == direct.config
    for a, b in zip(outputs(direct, root), outputs(reloaded, root), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(reloaded.logit_scale, direct.logit_scale)


def test_open_clip_training_checkpoint(parity, tmp_path):
    """open_clip's `epoch_N.pt`: the state dict under 'state_dict', DDP's `module.` prefix, optimizer state."""
    root = parity(REF)
    sd = {f"module.{k}": v for k, v in reference_state(root).items()}
    path = tmp_path / "epoch_3.pt"
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path
    )
    check_reference(stanvid.load_model(path, config=root), root)


# ---------------------------------------------------------------------------------------------- scripted archives
class _Archive(nn.Module):
    """Weights under their own key names plus named non-persistent buffers, as `torch.jit.script` on an open_clip
    `CLIP` stores them (`attn_mask` is non-persistent there, but a scripted module's state dict keeps it)."""

    def __init__(self, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state.items():
            *parents, leaf = key.split(".")
            module: nn.Module = self
            for name in parents:
                if not hasattr(module, name):
                    module.add_module(name, nn.Module())
                module = getattr(module, name)
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        for key, value in buffers.items():
            self.register_buffer(key, value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale.exp()


def script_archive(path: Path, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_Archive(state, buffers)), str(path))
    return path


def causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)


def test_scripted_open_clip_archive_drops_attn_mask(parity, tmp_path):
    root = parity(REF)
    state = reference_state(root)
    ctx = state["positional_embedding"].shape[0]
    path = script_archive(tmp_path / "scripted.pt", state, {"attn_mask": causal_mask(ctx)})
    assert stanvid.detect_format(path) == "openai-jit"
    check_reference(stanvid.load_model(path, config=root), root)
    check_reference(stanvid.load_model(path, **HEADS), root)


def test_unknown_buffer_is_not_dropped(parity, tmp_path):
    """Only buffers named in the key maps are dropped: anything else is reported."""
    root = parity(REF)
    path = script_archive(tmp_path / "odd.pt", reference_state(root), {"rope_cache": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"unmapped key\(s\): rope_cache"):
        stanvid.load_model(path, config=root)


# ---------------------------------------------------------------------------------------------- other sizes
def openai_layout(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in open_clip's (OpenAI's) key layout for an open_clip `model_cfg`."""
    g = torch.Generator().manual_seed(seed)
    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw = v["width"], t["width"]
    size = v["image_size"][0] if isinstance(v["image_size"], list) else v["image_size"]
    grid = size // v["patch_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    def blocks(prefix: str, width: int, layers: int, ratio: float) -> dict[str, torch.Tensor]:
        hidden = int(width * ratio)
        out = {}
        for i in range(layers):
            p = f"{prefix}.{i}."
            out |= {
                p + "attn.in_proj_weight": r(3 * width, width),
                p + "attn.in_proj_bias": r(3 * width),
                p + "attn.out_proj.weight": r(width, width),
                p + "attn.out_proj.bias": r(width),
                p + "ln_1.weight": 1 + r(width),
                p + "ln_1.bias": r(width),
                p + "ln_2.weight": 1 + r(width),
                p + "ln_2.bias": r(width),
                p + "mlp.c_fc.weight": r(hidden, width),
                p + "mlp.c_fc.bias": r(hidden),
                p + "mlp.c_proj.weight": r(width, hidden),
                p + "mlp.c_proj.bias": r(width),
            }
        return out

    return {
        "visual.conv1.weight": r(vw, 3, v["patch_size"], v["patch_size"]),
        "visual.class_embedding": r(vw),
        "visual.positional_embedding": r(grid * grid + 1, vw),
        "visual.ln_pre.weight": 1 + r(vw),
        "visual.ln_pre.bias": r(vw),
        **blocks("visual.transformer.resblocks", vw, v["layers"], v.get("mlp_ratio", 4.0)),
        "visual.ln_post.weight": 1 + r(vw),
        "visual.ln_post.bias": r(vw),
        "visual.proj": r(vw, d),
        "token_embedding.weight": r(t["vocab_size"], tw),
        "positional_embedding": r(t["context_length"], tw),
        **blocks("transformer.resblocks", tw, t["layers"], t.get("mlp_ratio", 4.0)),
        "ln_final.weight": 1 + r(tw),
        "ln_final.bias": r(tw),
        "text_projection": r(tw, d),
        "logit_scale": torch.tensor(4.2),
    }


OTHER = {
    "embed_dim": 20,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": [24, 24],
        "layers": 3,
        "width": 48,
        "head_width": 16,
        "mlp_ratio": 2.5,
        "patch_size": 6,
    },
    "text_cfg": {
        "context_length": 13,
        "vocab_size": 49408,
        "width": 40,
        "heads": 5,
        "layers": 2,
        "mlp_ratio": 3.0,
    },
}


def write_open_clip_folder(
    folder: Path, model_cfg: dict, preprocess: dict | None = None, *, seed: int = 0
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file(openai_layout(model_cfg, seed), str(folder / "open_clip_model.safetensors"))
    return folder


def test_other_sizes_folder_and_plain_file_agree(tmp_path):
    """Sizes no reference uses: heads from head_width, MLP from mlp_ratio, QuickGELU, list image size; the
    folder and the plain file with the same facts given by override give identical outputs."""
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"}
    folder = write_open_clip_folder(tmp_path / "oc", OTHER, pre)
    model = stanvid.load_model(folder)
    v, t = model.config.clip.vision, model.config.clip.text
    assert (v.heads, v.mlp_dim, v.image_size, v.act) == (3, 120, 24, "quick_gelu")
    assert (t.heads, t.mlp_dim, t.context_length, t.act) == (5, 120, 13, "quick_gelu")
    assert model.config.clip.preprocess.mean == (0.5, 0.4, 0.3)
    sd = load_file(folder / "open_clip_model.safetensors")
    assert torch.equal(model.visual.proj.weight, sd["visual.proj"].t())
    torch.save(sd, tmp_path / "plain.bin")
    plain = stanvid.load_model(
        tmp_path / "plain.bin", act="quick_gelu", vision_heads=3, text_heads=5, image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
    )  # fmt: skip
    assert plain.config == model.config
    images = torch.randn(2, 3, 24, 24)
    ids = stanvid.tokenize(["a cat", "two dogs on a beach"], context_length=13)
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), model.encode_image(images))
        assert torch.equal(plain.encode_text(ids), model.encode_text(ids))


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("vision_cfg", "ls_init_value", 1e-5),
        ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
        ("vision_cfg", "attentional_pool", True),
        ("vision_cfg", "no_ln_pre", True),
        ("vision_cfg", "pool_type", "avg"),
        ("vision_cfg", "layers", [3, 4, 6, 3]),
        ("vision_cfg", "image_size", [24, 32]),
        ("vision_cfg", "brand_new_option", 1),
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("text_cfg", "hf_tokenizer_name", "facebook/xlm-v-base"),
        ("text_cfg", "pool_type", "eos"),
        ("text_cfg", "embed_cls", True),
        ("text_cfg", "no_causal_mask", True),
        ("text_cfg", "act_kwargs", {"approximate": "tanh"}),
        (None, "custom_text", True),
        (None, "init_logit_bias", -10.0),
        (None, "multimodal_cfg", {"width": 64}),
    ],
)
def test_unsupported_open_clip_options_are_refused_by_name(section, key, value):
    cfg = json.loads(json.dumps(OTHER))
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ConfigError, match=key if key != "layers" else "ResNet"):
        open_clip_config({"model_cfg": cfg})


def test_harmless_open_clip_options_are_accepted():
    cfg = json.loads(json.dumps(OTHER))
    cfg["cast_dtype"] = "fp16"
    cfg["vision_cfg"] |= {"patch_dropout": 0.5, "ls_init_value": None, "norm_kwargs": {"eps": 1e-6}}
    cfg["text_cfg"] |= {"pad_id": 0, "proj_type": "linear"}
    clip = open_clip_config({"model_cfg": cfg})
    assert clip.vision.ln_eps == 1e-6 and clip.text.ln_eps == 1e-5


# ---------------------------------------------------------------------------------------------- arguments
def test_every_argument_is_applied_or_refused(parity, tmp_path):
    root = parity(REF)
    with pytest.raises(ConfigError, match="act.*records its activation"):
        stanvid.load_model(root, act="gelu")
    with pytest.raises(ConfigError, match="config= is only for"):
        stanvid.load_model(root, config=root)
    saved = tmp_path / "saved"
    stanvid.load_model(root).save_pretrained(saved)
    with pytest.raises(ConfigError, match="vision_heads"):
        stanvid.load_model(saved, vision_heads=2)
    with pytest.raises(ConfigError, match="unknown model override 'heads'"):
        stanvid.load_model(root, heads=4)
    # normalization is not architecture: applied everywhere
    model = stanvid.load_model(saved, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert model.config.clip.preprocess.mean == (0.5, 0.5, 0.5)


def test_cli_set_is_typed_and_checked(parity, tmp_path, capsys):
    src = parity(REF) / "open_clip_model.safetensors"
    for bad, said in [
        ("vision_heads=four", "expected an integer"),
        ("image_mean=0.5,x,0.5", "comma-separated numbers"),
        ("grad_checkpointing=maybe", "true or false"),
        ("heads=4", "unknown model override"),
    ]:
        assert cli_main(["convert", str(src), str(tmp_path / "o"), "--set", bad]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    assert (
        cli_main(["convert", str(src), str(tmp_path / "o"), "--set", "act=relu", "--set", "vision_heads=4"])
        == 2
    )
    assert "act" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- names online
def publish_reference(hub_root: Path, repo: str, root: Path, *, drop: tuple[str, ...] = ()) -> None:
    """The reference's open_clip files as repository `repo` of the fake hub (optionally with config keys left out)."""
    dest = hub_root / repo
    dest.mkdir(parents=True)
    cfg = json.loads((root / "open_clip_config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    (dest / "open_clip_config.json").write_text(json.dumps(cfg))
    shutil.copy(root / "open_clip_model.safetensors", dest)


def test_hf_hub_name_loads_the_open_clip_files(parity, fake_hub):
    root = parity(REF)
    publish_reference(fake_hub.root, "someone/tiny-clip", root)
    check_reference(stanvid.load_model("hf-hub:someone/tiny-clip"), root)
    assert ("someone/tiny-clip", "open_clip_config.json") in fake_hub.requested
    # a plain hub id of an open_clip-only repository reads the same files
    check_reference(stanvid.load_model("someone/tiny-clip"), root)


@pytest.mark.parametrize("other_config", ["hf", "timm"])
def test_repository_with_two_copies_downloads_one(parity, fake_hub, other_config):
    """LAION repositories hold a Hugging Face and an open_clip copy; timm's a timm config.json beside the
    open_clip files. A plain hub id reads the open_clip copy and downloads no other weights."""
    root = parity(REF)
    publish_reference(fake_hub.root, "org/two-copies", root)
    if other_config == "hf":
        shutil.copy(parity("stan_tiny_a") / "hf_clip" / "config.json", fake_hub.root / "org/two-copies")
        shutil.copy(parity("stan_tiny_a") / "hf_clip" / "model.safetensors", fake_hub.root / "org/two-copies")
    else:
        timm_cfg = {"architecture": "vit_base_patch32_clip_224", "num_classes": 512}
        (fake_hub.root / "org/two-copies" / "config.json").write_text(json.dumps(timm_cfg))
    check_reference(stanvid.load_model("org/two-copies"), root)
    weights = [
        name for _, name in fake_hub.requested if not name.endswith(".json") and name not in TOKENIZER_FILES
    ]
    assert weights == ["open_clip_model.safetensors"]


def test_pretrained_name_resolves_through_the_table(parity, fake_hub):
    root = parity(REF)
    entry = zoo.lookup("ViT-B-32/laion2b_s34b_b79k")
    assert entry is not None and not entry.quick_gelu
    publish_reference(fake_hub.root, entry.repo, root)
    model = stanvid.load_model("ViT-B-32/laion2b_s34b_b79k")
    check_reference(model, root)
    assert {repo for repo, _ in fake_hub.requested} == {entry.repo}
    assert stanvid.load_model("ViT-B-32:LAION2B-S34B-B79K").config == model.config  # open_clip's spellings


def test_pretrained_table_has_the_last_word_on_activation_and_normalization(parity, fake_hub):
    """MetaCLIP was trained with QuickGELU and L/14 LAION-2B with mean = std = 0.5, whatever a config omits."""
    root = parity(REF)
    metaclip = zoo.lookup("ViT-B-32/metaclip_400m")
    publish_reference(fake_hub.root, metaclip.repo, root, drop=("preprocess_cfg",))
    model = stanvid.load_model("ViT-B-32-quickgelu/metaclip_400m")
    assert (
        model.config.clip.vision.act
        == model.config.clip.text.act
        == "quick_gelu"
        == ("quick_gelu" if metaclip.quick_gelu else "gelu")
    )
    laion_l = zoo.lookup("ViT-L-14/laion2b_s32b_b82k")
    publish_reference(fake_hub.root, laion_l.repo, root)
    model = stanvid.load_model("ViT-L-14/laion2b_s32b_b82k")
    assert model.config.clip.preprocess.mean == laion_l.mean == (0.5, 0.5, 0.5)
    assert model.config.clip.vision.act == "gelu"


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(CheckpointError, match="laion2b_s34b_b79k"):
        stanvid.load_model("ViT-B-32/laion2b_s34b_b7")
    with pytest.raises(CheckpointError, match="only names QuickGELU releases"):
        stanvid.load_model("ViT-B-32-quickgelu/laion2b_s34b_b79k")


def test_pretrained_name_offline_says_what_to_download(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is an optional extra")
    from huggingface_hub import errors

    def offline(repo_id, filename, **_):
        raise errors.LocalEntryNotFoundError(f"offline: {filename} of {repo_id} is not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError) as err:
        stanvid.load_model("ViT-B-16/datacomp_xl_s13b_b90k")
    msg = str(err.value)
    repo = zoo.lookup("ViT-B-16/datacomp_xl_s13b_b90k").repo
    assert f"https://huggingface.co/{repo}" in msg
    assert "open_clip_config.json" in msg and "open_clip_model.safetensors" in msg and "folder" in msg


def test_every_table_entry_resolves_and_names_a_repository():
    names = zoo.known_names()
    assert len(names) == len(set(names))
    for name in names:
        entry = zoo.lookup(name)
        assert entry is not None and entry.repo.count("/") == 1, name
        if entry.quick_gelu:
            model, tag = name.split("/")
            assert zoo.lookup(f"{model}-quickgelu/{tag}") == entry


# ---------------------------------------------------------------------------------------------- index normalization
def test_index_normalizes_frames_with_the_models_values(tmp_path):
    """`stanvid index` embeds frames normalized as the model's config says, not with OpenAI's constants."""
    pytest.importorskip("faiss")
    from indexkit import index_model, reference_embedding, rows, write_clip
    from stanvid.search.index import build_index, model_fingerprint
    from stanvid.video.transforms import EvalTransform

    model = index_model()
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    custom = stanvid.VideoCLIP(model.config.replace(image_mean=mean, image_std=std)).eval()
    custom.load_state_dict(model.state_dict())
    write_clip(tmp_path / "v" / "a.mp4", 20, 1)
    build_index(
        tmp_path / "v",
        tmp_path / "idx",
        custom,
        model_source="custom",
        num_workers=0,
        progress=False,
        precision="fp32",
    )
    ((path, start, end, emb),) = rows(tmp_path / "idx")
    info = stanvid.probe(tmp_path / "v" / path)
    idx = stanvid.uniform_indices(info.num_frames, custom.config.num_frames)
    size = custom.config.clip.vision.image_size
    clip = EvalTransform(size, mean=mean, std=std)(stanvid.read_frames(tmp_path / "v" / path, idx, size=size))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(custom.encode_video(clip[None]), dim=-1)[0].numpy()
    assert abs(emb - expected).max() <= 2e-5
    assert abs(emb - reference_embedding(model, tmp_path / "v" / path, start, end)).max() > 1e-3
    assert model_fingerprint(custom) != model_fingerprint(model)  # an index of one is refused to the other


def test_hf_directory_reads_its_preprocessor_config(parity, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(parity("stan_tiny_a") / "hf_clip", folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    pre = stanvid.load_model(folder).config.clip.preprocess
    assert (pre.mean, pre.std) == ((0.5,) * 3, (0.25,) * 3)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ConfigError, match="preprocessor_config.json.*mean"):
        stanvid.load_model(folder)


def test_config_argument_is_a_clip_config_or_refused(parity):
    """`config=` is applied (a `CLIPConfig` object as well as a file or dict) or refused by name, never half used."""
    path = parity("openai_tiny_a") / "openai_state_dict.pt"
    plain = stanvid.load_model(path)
    wider = dataclasses.replace(plain.config.clip.vision, heads=plain.config.clip.vision.heads * 2)
    given = dataclasses.replace(plain.config.clip, vision=wider)
    assert stanvid.load_model(path, config=given).config.clip.vision.heads == wider.heads  # applied
    with pytest.raises(ConfigError, match="not a ModelConfig"):
        stanvid.load_model(path, config=plain.config)
    with pytest.raises(ConfigError, match="config= must be a path, a dict or a CLIPConfig, got int"):
        stanvid.load_model(path, config=3)
