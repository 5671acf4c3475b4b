"""Hugging Face SigLIP folders (`config.json` with `model_type: siglip`): SigLIP and the fixed-resolution
SigLIP 2 releases (`google/siglip-*`, `google/siglip2-base-patch16-224`, ...).

Read once, in this order: `config.json` (architecture, with transformers' `SiglipConfig` defaults for what it
leaves out), `preprocessor_config.json` (mean, std, resampling; `SiglipImageProcessor` resizes the whole image to
the square input, no crop: `squash`), the tokenizer (`spiece.model` for `SiglipTokenizer`, else
`tokenizer.json`, as transformers loads them), then the weights through `SIGLIP_RULES`. `model_type: siglip2`
(NaFlex, variable resolution and aspect ratio) is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stanvid.checkpoints import convert
from stanvid.checkpoints.convert import BLOCK_HF, block_rules
from stanvid.checkpoints.families import (
    FamilyCheckpoint,
    finish_state,
    preprocess_from,
    read_object,
    read_tokenizer_file,
)
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import CLIPConfig, TextConfig, TokenizerConfig, VisionConfig

SIGLIP_RULES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"visual.patch_embed.\1"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
    *block_rules(r"vision_model\.encoder\.layers", "visual.blocks", BLOCK_HF),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"vision_model\.head\.probe", "visual.pool.probe"),  # (1, 1, C) -> (1, C)
    (r"vision_model\.head\.attention\.in_proj_(weight|bias)", r"visual.pool.in_proj.\1"),  # -> q, kv
    (r"vision_model\.head\.attention\.out_proj\.(weight|bias)", r"visual.pool.proj.\1"),
    (r"vision_model\.head\.layernorm\.(weight|bias)", r"visual.pool.ln.\1"),
    (r"vision_model\.head\.mlp\.(fc1|fc2)\.(weight|bias)", r"visual.pool.mlp.\1.\2"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embed.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
    *block_rules(r"text_model\.encoder\.layers", "text.blocks", BLOCK_HF),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_model\.head\.(weight|bias)", r"text.proj.\1"),
    (r"logit_scale", "logit_scale"),  # (1,) -> ()
    (r"logit_bias", "logit_bias"),
]
SIGLIP_BUFFERS = {"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"}

_ACTS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}
# transformers' SiglipVisionConfig / SiglipTextConfig defaults, for keys a config.json leaves out
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)
_TEXT_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    vocab_size=32000,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    projection_size=None,
)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes in preprocessor_config.json


def is_siglip_config(config: Any) -> bool:
    return isinstance(config, dict) and config.get("model_type") in ("siglip", "siglip2")


def siglip_clip_config(config: dict[str, Any], where: str) -> CLIPConfig:
    """A Hugging Face `SiglipConfig` (dict) -> `CLIPConfig` of the siglip family (preprocessing and tokenizer
    left at their defaults: `read_siglip_folder` sets them from the files beside it)."""
    if config.get("model_type") == "siglip2":
        raise ConfigError(
            f"{where}: model_type 'siglip2' is a SigLIP 2 NaFlex model (variable resolution and aspect ratio), "
            f"which stanvid does not support; the fixed-resolution SigLIP 2 releases (model_type 'siglip', e.g. "
            f"google/siglip2-base-patch16-224) load"
        )
    v = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    t = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    for part, d in (("vision_config", v), ("text_config", t)):
        if d["hidden_act"] not in _ACTS:
            raise ConfigError(
                f"{where}: {part}.hidden_act {d['hidden_act']!r} is not supported; supported: {', '.join(_ACTS)}"
            )
    if v["vision_use_head"] is not True:
        raise ConfigError(
            f"{where}: vision_config.vision_use_head = false (no pooling head) is not supported"
        )
    try:
        return CLIPConfig(
            family="siglip",
            embed_dim=int(t["projection_size"] or t["hidden_size"]),
            vision=VisionConfig(
                width=v["hidden_size"],
                layers=v["num_hidden_layers"],
                heads=v["num_attention_heads"],
                patch_size=v["patch_size"],
                image_size=v["image_size"],
                mlp_dim=v["intermediate_size"],
                act=_ACTS[v["hidden_act"]],
                ln_eps=float(v["layer_norm_eps"]),
                class_token=False,
            ),
            text=TextConfig(
                width=t["hidden_size"],
                layers=t["num_hidden_layers"],
                heads=t["num_attention_heads"],
                context_length=t["max_position_embeddings"],
                vocab_size=t["vocab_size"],
                mlp_dim=t["intermediate_size"],
                act=_ACTS[t["hidden_act"]],
                ln_eps=float(t["layer_norm_eps"]),
            ),
            logit_scale_init=0.0,
            logit_bias_init=0.0,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _preprocess(folder: Path, image_size: int):
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return preprocess_from(str(path), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SiglipImageProcessor's defaults
    data = read_object(path)
    size = data.get("size") or {}
    if isinstance(size, dict) and {size.get("height"), size.get("width")} - {image_size, None}:
        raise ConfigError(f"{path}: size {size} differs from the model's image_size {image_size}")
    resample = data.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ConfigError(f"{path}: resample {resample!r} is not supported (2 bilinear, 3 bicubic)")
    return preprocess_from(
        str(path),
        data.get("image_mean", (0.5, 0.5, 0.5)),
        data.get("image_std", (0.5, 0.5, 0.5)),
        "squash",
        _RESAMPLE[resample],
    )


def _tokenizer(folder: Path) -> tuple[TokenizerConfig, dict[str, bytes]]:
    """`SiglipTokenizer` on `spiece.model`, else the folder's `tokenizer.json` (transformers' choice)."""
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = read_object(cfg_path) if cfg_path.is_file() else {}
    names = {k: tok_cfg.get(k) for k in ("pad_token", "eos_token", "unk_token")}
    for key, value in names.items():
        if isinstance(value, dict):  # an AddedToken written out
            names[key] = value.get("content")
        if names[key] is not None and not isinstance(names[key], str):
            raise ConfigError(f"{cfg_path}: {key} must be a string, got {names[key]!r}")
    cls = tok_cfg.get("tokenizer_class", "SiglipTokenizer")
    if (folder / "spiece.model").is_file() and cls == "SiglipTokenizer":
        lower = tok_cfg.get("do_lower_case", True)
        if not isinstance(lower, bool):
            raise ConfigError(f"{cfg_path}: do_lower_case must be true or false, got {lower!r}")
        cfg = TokenizerConfig(
            kind="sentencepiece",
            file="spiece.model",
            lower=lower,
            pad_token=names["pad_token"] or "</s>",
            eos_token=names["eos_token"] or "</s>",
            unk_token=names["unk_token"] or "<unk>",
        )
        return cfg, {"spiece.model": read_tokenizer_file(folder / "spiece.model")}
    if (folder / "tokenizer.json").is_file():
        cfg = TokenizerConfig(
            kind="hf", file="tokenizer.json", clean="none", pad_token=names["pad_token"] or "<pad>"
        )
        return cfg, {"tokenizer.json": read_tokenizer_file(folder / "tokenizer.json")}
    raise CheckpointError(
        f"{folder}: no tokenizer (spiece.model for SiglipTokenizer, or tokenizer.json) beside the SigLIP weights"
    )


def read_siglip_folder(folder: Path, raw: dict[str, Any]) -> FamilyCheckpoint:
    """A Hugging Face SigLIP folder (config, preprocessing, tokenizer) with its raw weights -> `FamilyCheckpoint`."""
    cfg_path = folder / "config.json"
    clip = siglip_clip_config(read_object(cfg_path), str(cfg_path))
    tokenizer, files = _tokenizer(folder)
    clip.preprocess = _preprocess(folder, clip.vision.image_size)
    clip.tokenizer = tokenizer
    state = convert.convert_state_dict(raw, SIGLIP_RULES, ignored=SIGLIP_BUFFERS, source=str(folder))
    return FamilyCheckpoint(clip, finish_state(state, clip, str(folder)), files)
