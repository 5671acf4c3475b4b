"""open_clip folders whose image tower is a timm model: SigLIP, SigLIP 2 and PE-Core releases.

`TIMM_TOWERS` is the table of the timm towers named by open_clip's released configs, with the architecture timm
gives each (`timm/models/vision_transformer.py` for `vit_*_siglip_*`, `timm/models/eva.py` for
`vit_pe_core_*`). `vision_cfg.timm_model_kwargs` (open_clip's newer key: keyword arguments over the named model's
defaults, as `timm.create_model` takes them) is honoured for the arguments in `_KWARGS`; any other is refused by
name. The text tower is open_clip's `TextTransformer`: for SigLIP with `no_causal_mask`, `pool_type: last` and a
projection bias (checked, refused otherwise), for PE-Core CLIP's own; the tokenizer is the folder's
`tokenizer.json` with `text_cfg.tokenizer_kwargs.clean` (open_clip's `HFTokenizer`) or CLIP's BPE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stanvid.checkpoints import convert
from stanvid.checkpoints.convert import BLOCK_OPENAI, block_rules
from stanvid.checkpoints.families import (
    FamilyCheckpoint,
    finish_state,
    preprocess_from,
    read_object,
    read_tokenizer_file,
)
from stanvid.errors import ConfigError
from stanvid.models.config import CLIPConfig, TextConfig, TokenizerConfig, VisionConfig


@dataclass(frozen=True)
class TimmTower:
    """A timm image tower as `timm.create_model(name)` builds it (before `timm_model_kwargs`)."""

    family: str  # siglip | pecore
    patch_size: int
    width: int
    depth: int
    heads: int
    image_size: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    class_token: bool = False
    map_heads: int | None = None  # None: the tower's heads
    map_mlp_ratio: float | None = None  # None: the tower's
    rope_ref_grid: int | None = None
    rope_grid_offset: float = 0.0


def _siglip(
    patch: int, width: int, depth: int, heads: int, size: int, act: str = "gelu", mlp=4.0
) -> TimmTower:
    return TimmTower("siglip", patch, width, depth, heads, size, mlp, act)


def _pe(patch: int, width: int, depth: int, heads: int, size: int, ref: int, **kw: Any) -> TimmTower:
    kw.setdefault("class_token", True)
    kw.setdefault("rope_grid_offset", 1.0)
    return TimmTower(
        "pecore",
        patch,
        width,
        depth,
        heads,
        size,
        ln_eps=1e-5,
        map_heads=8,
        map_mlp_ratio=4.0,
        rope_ref_grid=ref,
        **kw,
    )


_SO400M = 3.7362
TIMM_TOWERS: dict[str, TimmTower] = {
    "vit_base_patch32_siglip_256": _siglip(32, 768, 12, 12, 256, "gelu_tanh"),
    "vit_base_patch16_siglip_224": _siglip(16, 768, 12, 12, 224),
    "vit_base_patch16_siglip_256": _siglip(16, 768, 12, 12, 256),
    "vit_base_patch16_siglip_384": _siglip(16, 768, 12, 12, 384),
    "vit_base_patch16_siglip_512": _siglip(16, 768, 12, 12, 512),
    "vit_large_patch16_siglip_256": _siglip(16, 1024, 24, 16, 256),
    "vit_large_patch16_siglip_384": _siglip(16, 1024, 24, 16, 384),
    "vit_large_patch16_siglip_512": _siglip(16, 1024, 24, 16, 512, "gelu_tanh"),
    "vit_so400m_patch14_siglip_224": _siglip(14, 1152, 27, 16, 224, mlp=_SO400M),
    "vit_so400m_patch14_siglip_378": _siglip(14, 1152, 27, 16, 378, mlp=_SO400M),
    "vit_so400m_patch14_siglip_384": _siglip(14, 1152, 27, 16, 384, mlp=_SO400M),
    "vit_so400m_patch16_siglip_256": _siglip(16, 1152, 27, 16, 256, "gelu_tanh", _SO400M),
    "vit_so400m_patch16_siglip_384": _siglip(16, 1152, 27, 16, 384, "gelu_tanh", _SO400M),
    "vit_so400m_patch16_siglip_512": _siglip(16, 1152, 27, 16, 512, "gelu_tanh", _SO400M),
    "vit_giantopt_patch16_siglip_256": _siglip(16, 1536, 40, 16, 256, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_384": _siglip(16, 1536, 40, 16, 384, "gelu_tanh"),
    "vit_pe_core_tiny_patch16_384": _pe(16, 192, 12, 3, 384, 24),
    "vit_pe_core_small_patch16_384": _pe(16, 384, 12, 6, 384, 24),
    "vit_pe_core_base_patch16_224": _pe(16, 768, 12, 12, 224, 14),
    "vit_pe_core_large_patch14_336": _pe(14, 1024, 24, 16, 336, 24),
    "vit_pe_core_gigantic_patch14_448": _pe(
        14, 1536, 50, 16, 448, 32, mlp_ratio=8960 / 1536, class_token=False, rope_grid_offset=0.0
    ),
}
# timm_model_kwargs stanvid applies -> the TimmTower field each sets (None: checked, not stored)
_KWARGS = {
    "embed_dim": "width",
    "depth": "depth",
    "num_heads": "heads",
    "patch_size": "patch_size",
    "img_size": "image_size",
    "mlp_ratio": "mlp_ratio",
    "class_token": "class_token",
    "ref_feat_shape": "rope_ref_grid",
    "rope_grid_offset": "rope_grid_offset",
    "attn_pool_num_heads": "map_heads",
    "attn_pool_mlp_ratio": "map_mlp_ratio",
    "num_classes": None,
    "drop_path_rate": None,
    "drop_rate": None,
    "patch_drop_rate": None,
}

OPEN_CLIP_TIMM_RULES: list[tuple[str, str]] = [
    (r"visual\.trunk\.patch_embed\.proj\.(weight|bias)", r"visual.patch_embed.\1"),
    (r"visual\.trunk\.pos_embed", "visual.pos_embed"),  # (1, L, C) -> (L, C)
    (r"visual\.trunk\.cls_token", "visual.class_embedding"),  # (1, 1, C) -> (C,)
    (r"visual\.trunk\.norm_pre\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"visual\.trunk\.blocks\.(\d+)\.norm1\.(weight|bias)", r"visual.blocks.\1.ln_1.\2"),
    (r"visual\.trunk\.blocks\.(\d+)\.norm2\.(weight|bias)", r"visual.blocks.\1.ln_2.\2"),
    (r"visual\.trunk\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"visual.blocks.\1.attn.\2.\3"),
    (r"visual\.trunk\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"visual.blocks.\1.mlp.\2.\3"),
    (r"visual\.trunk\.norm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"visual\.trunk\.attn_pool\.latent", "visual.pool.probe"),  # (1, 1, C) -> (1, C)
    (r"visual\.trunk\.attn_pool\.(q|kv|proj)\.(weight|bias)", r"visual.pool.\1.\2"),
    (r"visual\.trunk\.attn_pool\.norm\.(weight|bias)", r"visual.pool.ln.\1"),
    (r"visual\.trunk\.attn_pool\.mlp\.(fc1|fc2)\.(weight|bias)", r"visual.pool.mlp.\1.\2"),
    (r"visual\.trunk\.head\.(weight|bias)", r"visual.proj.\1"),
    (r"text\.token_embedding\.weight", "text.token_embed.weight"),
    (r"text\.positional_embedding", "text.pos_embed"),
    *block_rules(r"text\.transformer\.resblocks", "text.blocks", BLOCK_OPENAI),
    (r"text\.ln_final\.(weight|bias)", r"text.ln_final.\1"),
    (r"text\.text_projection\.(weight|bias)", r"text.proj.\1"),  # SigLIP: an nn.Linear
    (r"text\.text_projection", "text.proj.weight"),  # CLIP-style: x @ W, transposed
    (r"logit_scale", "logit_scale"),
    (r"logit_bias", "logit_bias"),
]
OPEN_CLIP_TIMM_TRANSPOSED = {"text.text_projection"}
OPEN_CLIP_TIMM_BUFFERS = {"text.attn_mask"}

_MODEL_KEYS = {
    "embed_dim",
    "init_logit_bias",
    "custom_text",
    "vision_cfg",
    "text_cfg",
    "quick_gelu",
    "init_logit_scale",
}
_MODEL_NEUTRAL = {"cast_dtype", "nonscalar_logit_scale"}
_VISION_KEYS = {
    "image_size",
    "timm_model_name",
    "timm_model_kwargs",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
}
_VISION_NEUTRAL = {"timm_model_pretrained", "timm_drop", "timm_drop_path", "patch_dropout", "output_tokens"}
_TEXT_KEYS = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs", "act_kwargs",
    "no_causal_mask", "proj_bias", "pool_type", "hf_tokenizer_name", "tokenizer_kwargs",
}  # fmt: skip
_TEXT_NEUTRAL = {
    "output_tokens",
    "pad_id",
    "embed_cls",
    "ls_init_value",
    "proj_type",
    "text_arch",
    "tokenizer_mode",
}


def _siglip_release(name: str, size: int, version: int) -> dict[str, Any]:
    """open_clip's `model_configs/ViT-B-16-SigLIP{,2}[-size].json`."""
    text = {
        "context_length": 64, "vocab_size": 256000 if version == 2 else 32000, "hf_tokenizer_name": f"timm/{name}",
        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 768, "heads": 12, "layers": 12,
        "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
    }  # fmt: skip
    if version == 2:
        text["act_kwargs"] = {"approximate": "tanh"}
    vision = {"image_size": size, "timm_model_name": f"vit_base_patch16_siglip_{size}", "timm_proj": "none"}
    return {
        "embed_dim": 768,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": vision,
        "text_cfg": text,
    }


def _pe_release(tower: str, size: int) -> dict[str, Any]:
    """open_clip's `model_configs/PE-Core-B-16.json` / `PE-Core-L-14-336.json`."""
    text = {"context_length": 32, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
    vision = {"image_size": size, "timm_model_name": tower, "timm_proj": None}
    return {"embed_dim": 1024, "custom_text": True, "vision_cfg": vision, "text_cfg": text}


# open_clip model names -> their `model_cfg` (architecture only): what `stanvid.create_model` builds at random
RELEASES: dict[str, dict[str, Any]] = {
    "ViT-B-16-SigLIP": _siglip_release("ViT-B-16-SigLIP", 224, 1),
    "ViT-B-16-SigLIP2": _siglip_release("ViT-B-16-SigLIP2", 224, 2),
    **{f"ViT-B-16-SigLIP2-{s}": _siglip_release(f"ViT-B-16-SigLIP2-{s}", s, 2) for s in (256, 384, 512)},
    "PE-Core-B-16": _pe_release("vit_pe_core_base_patch16_224", 224),
    "PE-Core-L-14-336": _pe_release("vit_pe_core_large_patch14_336", 336),
}


def release_clip_config(name: str) -> CLIPConfig | None:
    """The architecture of an open_clip SigLIP / PE-Core release by its model name, or None."""
    if name not in RELEASES:
        return None
    return timm_tower_clip_config({"model_cfg": RELEASES[name]}, name)


def is_timm_tower_config(config: Any) -> bool:
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    vision = model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None
    return isinstance(vision, dict) and bool(vision.get("timm_model_name"))


def _check_keys(section: Any, known: set[str], neutral: set[str], where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - known - neutral)
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} not supported by stanvid for a timm tower")
    return section


def _tower(vision: dict[str, Any], where: str) -> TimmTower:
    """The named tower, with `timm_model_kwargs` over its defaults (refused by name where not applied)."""
    name = vision["timm_model_name"]
    if name not in TIMM_TOWERS:
        raise ConfigError(
            f"{where}.timm_model_name {name!r} is not supported; supported: {', '.join(TIMM_TOWERS)} "
            f"(naflexvit towers are SigLIP 2 NaFlex: variable resolution, not supported)"
        )
    tower = TIMM_TOWERS[name]
    kwargs = vision.get("timm_model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.timm_model_kwargs must be a mapping, got {type(kwargs).__name__}")
    changes: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in _KWARGS:
            raise ConfigError(
                f"{where}.timm_model_kwargs.{key} is not supported by stanvid (it applies {', '.join(_KWARGS)})"
            )
        field = _KWARGS[key]
        if field is None:
            continue
        if key == "ref_feat_shape":
            value = _square(value, f"{where}.timm_model_kwargs.{key}")
        if key == "img_size":
            value = _square(value, f"{where}.timm_model_kwargs.{key}")
        changes[field] = value
    tower = replace(tower, **changes)
    if tower.family == "siglip" and tower.class_token:
        raise ConfigError(
            f"{where}.timm_model_kwargs.class_token: a SigLIP tower with a class token is not supported"
        )
    return tower


def _square(value: Any, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where} {value!r}: only square grids and images are supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _text_config(text: dict[str, Any], family: str, quick_gelu: bool, where: str) -> TextConfig:
    want = (
        {"no_causal_mask": True, "pool_type": "last", "proj_bias": True}
        if family == "siglip"
        else {"no_causal_mask": False, "pool_type": "argmax", "proj_bias": False}
    )
    defaults = {"no_causal_mask": False, "pool_type": "argmax", "proj_bias": False}
    for key, value in want.items():
        if text.get(key, defaults[key]) != value:
            raise ConfigError(
                f"{where}.{key} = {text.get(key, defaults[key])!r} is not supported with a {family} image tower "
                f"(stanvid's {family} text tower has {key} = {value!r})"
            )
    act = "quick_gelu" if quick_gelu else "gelu"
    act_kwargs = text.get("act_kwargs") or {}
    if act_kwargs not in ({}, {"approximate": "tanh"}, {"approximate": "none"}):
        raise ConfigError(f"{where}.act_kwargs {act_kwargs!r} is not supported (approximate: tanh or none)")
    if act_kwargs.get("approximate") == "tanh":
        act = "gelu_tanh"
    eps = (text.get("norm_kwargs") or {}).get("eps", 1e-5)
    width = text.get("width", 512)
    try:
        return TextConfig(
            width=width,
            layers=text.get("layers", 12),
            heads=text.get("heads", 8),
            context_length=text.get("context_length", 77),
            vocab_size=text.get("vocab_size", 49408),
            mlp_dim=int(width * text.get("mlp_ratio", 4.0)),
            act=act,
            ln_eps=float(eps),
        )
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _tokenizer_config(text: dict[str, Any], where: str) -> TokenizerConfig:
    """CLIP BPE, or (with `hf_tokenizer_name`; empty names the folder's own, as open_clip reads a hub folder) a
    `tokenizer.json` with the configured clean mode."""
    if "hf_tokenizer_name" not in text:
        return TokenizerConfig()
    clean = (text.get("tokenizer_kwargs") or {}).get("clean", "whitespace")  # HFTokenizer's default
    if clean not in ("canonicalize", "lower", "whitespace"):
        raise ConfigError(
            f"{where}.tokenizer_kwargs.clean {clean!r} is not supported (canonicalize, lower, whitespace)"
        )
    return TokenizerConfig(kind="hf", file="tokenizer.json", clean=clean, pad_token="<pad>")


def _tokenizer_files(
    folder: Path, cfg: TokenizerConfig, name: str
) -> tuple[TokenizerConfig, dict[str, bytes]]:
    """The folder's `tokenizer.json`, and the pad token its `tokenizer_config.json` names."""
    if cfg.kind == "clip":
        return cfg, {}
    path = folder / cfg.file
    if not path.is_file():
        raise ConfigError(
            f"{folder}: text_cfg.hf_tokenizer_name is {name!r}: put that tokenizer's tokenizer.json (and "
            f"tokenizer_config.json) beside open_clip_config.json"
        )
    tok_cfg_path = folder / "tokenizer_config.json"
    pad = (read_object(tok_cfg_path) if tok_cfg_path.is_file() else {}).get("pad_token", cfg.pad_token)
    if isinstance(pad, dict):
        pad = pad.get("content")
    if not isinstance(pad, str):
        raise ConfigError(f"{tok_cfg_path}: pad_token must be a string, got {pad!r}")
    return replace(cfg, pad_token=pad), {cfg.file: read_tokenizer_file(path)}


def timm_tower_clip_config(config: dict[str, Any], where: str) -> CLIPConfig:
    """An `open_clip_config.json` with a timm image tower -> `CLIPConfig` (tokenizer left to the folder)."""
    model_cfg = _check_keys(
        config.get("model_cfg", config), _MODEL_KEYS, _MODEL_NEUTRAL, f"{where}: model_cfg"
    )
    vw, tw = f"{where}: model_cfg.vision_cfg", f"{where}: model_cfg.text_cfg"
    vision = _check_keys(model_cfg.get("vision_cfg"), _VISION_KEYS, _VISION_NEUTRAL, vw)
    text = _check_keys(model_cfg.get("text_cfg") or {}, _TEXT_KEYS, _TEXT_NEUTRAL, tw)
    tower = _tower(vision, vw)
    if vision.get("timm_pool", "map") != "map":
        raise ConfigError(f"{vw}.timm_pool {vision.get('timm_pool')!r} is not supported (map)")
    embed_dim = model_cfg.get("embed_dim", 512)
    proj = vision.get("timm_proj")
    if tower.family == "siglip" and (proj != "none" or embed_dim != tower.width):
        raise ConfigError(
            f"{vw}.timm_proj {proj!r}: a SigLIP tower is read with timm_proj 'none' (no projection)"
        )
    if tower.family == "pecore" and proj not in (None, ""):
        raise ConfigError(
            f"{vw}.timm_proj {proj!r}: a PE-Core tower projects with its own head (timm_proj null)"
        )
    num_classes = (vision.get("timm_model_kwargs") or {}).get("num_classes", embed_dim)
    if tower.family == "pecore" and num_classes != embed_dim:
        raise ConfigError(
            f"{vw}.timm_model_kwargs.num_classes {num_classes!r} differs from embed_dim {embed_dim}"
        )
    image_size = _square(vision.get("image_size", tower.image_size), f"{vw}.image_size")
    if image_size != tower.image_size:
        raise ConfigError(
            f"{vw}.image_size {image_size} differs from the timm tower's img_size {tower.image_size}"
        )
    quick_gelu = model_cfg.get("quick_gelu", False)
    pre = config.get("preprocess_cfg") or {}
    bias = model_cfg.get("init_logit_bias")
    try:
        return CLIPConfig(
            family=tower.family,
            embed_dim=embed_dim,
            vision=VisionConfig(
                width=tower.width,
                layers=tower.depth,
                heads=tower.heads,
                patch_size=tower.patch_size,
                image_size=tower.image_size,
                mlp_dim=int(tower.width * tower.mlp_ratio),
                act=tower.act,
                ln_eps=tower.ln_eps,
                class_token=tower.class_token,
                map_heads=tower.map_heads,
                map_mlp_dim=int(tower.width * tower.map_mlp_ratio) if tower.map_mlp_ratio else None,
                rope_ref_grid=tower.rope_ref_grid,
                rope_grid_offset=tower.rope_grid_offset,
            ),
            text=_text_config(text, tower.family, quick_gelu, tw),
            logit_scale_init=float(model_cfg.get("init_logit_scale", 2.6592)),
            logit_bias_init=None if tower.family != "siglip" else float(bias if bias is not None else -10.0),
            tokenizer=_tokenizer_config(text, tw),
            preprocess=preprocess_from(
                f"{where}: preprocess_cfg",
                pre.get("mean", (0.5, 0.5, 0.5)),
                pre.get("std", (0.5, 0.5, 0.5)),
                pre.get("resize_mode", "squash"),
                pre.get("interpolation", "bicubic"),
            ),
        )
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def read_timm_tower_folder(folder: Path, config_name: str, raw: dict[str, Any]) -> FamilyCheckpoint:
    """An open_clip folder with a timm image tower and its raw weights -> `FamilyCheckpoint`."""
    cfg_path = folder / config_name
    config = read_object(cfg_path)
    clip = timm_tower_clip_config(config, str(cfg_path))
    text = config.get("model_cfg", config).get("text_cfg") or {}
    clip.tokenizer, files = _tokenizer_files(folder, clip.tokenizer, text.get("hf_tokenizer_name"))
    state = convert.convert_state_dict(
        raw,
        OPEN_CLIP_TIMM_RULES,
        transposed=OPEN_CLIP_TIMM_TRANSPOSED,
        ignored=OPEN_CLIP_TIMM_BUFFERS,
        source=str(folder),
    )
    return FamilyCheckpoint(clip, finish_state(state, clip, str(folder)), files)
