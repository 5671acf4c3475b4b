"""Checkpoint key maps: OpenAI CLIP (and open_clip, which keeps OpenAI's key names), Hugging Face CLIP,
official STAN and CLIP4Clip -> stanvid.

Each format is a literal list of (foreign-key regex, stanvid key) rules plus a few reshapes (OpenAI stores
projections as `x @ W`, we use `nn.Linear`; Hugging Face splits q/k/v, we fuse them). `convert_state_dict`
maps every key or reports it; `load_converted` then checks the result against the model and raises one
`CheckpointError` listing every unmapped, missing and mis-shaped key. Nothing is silently dropped: the only keys
left out are the non-weight buffers and metadata each format is known to carry, listed by name beside its rules.

Config inference reads what the weights can tell (widths, depths, patch size, frame tables) the way OpenAI's
`build_model` does; head counts, activations and normalization come from a Hugging Face `config.json` or an
open_clip `open_clip_config.json` where one exists (`open_clip_config` refuses any open_clip option that stanvid's
towers do not implement, by name).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import (
    CLIPConfig,
    ModelConfig,
    PreprocessConfig,
    SeqTransfConfig,
    STANConfig,
    TextConfig,
    VisionConfig,
)

# ---------------------------------------------------------------------------------------------- key maps
BLOCK_OPENAI = [
    (r"attn\.in_proj_(weight|bias)", r"attn.qkv.\1"),
    (r"attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"ln_1\.(weight|bias)", r"ln_1.\1"),
    (r"ln_2\.(weight|bias)", r"ln_2.\1"),
    (r"mlp\.c_fc\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.c_proj\.(weight|bias)", r"mlp.fc2.\1"),
]
BLOCK_HF = [
    (r"self_attn\.(q|k|v)_proj\.(weight|bias)", r"attn.\1.\2"),  # fused into attn.qkv by _fuse_qkv
    (r"self_attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"layer_norm1\.(weight|bias)", r"ln_1.\1"),
    (r"layer_norm2\.(weight|bias)", r"ln_2.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"mlp.fc2.\1"),
]


def block_rules(foreign_prefix: str, our_prefix: str, rules) -> list[tuple[str, str]]:
    return [(rf"{foreign_prefix}\.(\d+)\.{pat}", rf"{our_prefix}.\1.{_shift(rep)}") for pat, rep in rules]


def _shift(replacement: str) -> str:
    """Renumber groups by one: the block index is group 1 in the combined pattern."""
    return re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), replacement)


OPENAI_RULES: list[tuple[str, str]] = [
    (r"visual\.conv1\.weight", "visual.patch_embed.weight"),
    (r"visual\.class_embedding", "visual.class_embedding"),
    (r"visual\.positional_embedding", "visual.pos_embed"),
    (r"visual\.ln_pre\.(weight|bias)", r"visual.ln_pre.\1"),
    *block_rules(r"visual\.transformer\.resblocks", "visual.blocks", BLOCK_OPENAI),
    (r"visual\.ln_post\.(weight|bias)", r"visual.ln_post.\1"),
    (r"visual\.proj", "visual.proj.weight"),  # transposed
    (r"token_embedding\.weight", "text.token_embed.weight"),
    (r"positional_embedding", "text.pos_embed"),
    *block_rules(r"transformer\.resblocks", "text.blocks", BLOCK_OPENAI),
    (r"ln_final\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_projection", "text.proj.weight"),  # transposed
    (r"logit_scale", "logit_scale"),
]
OPENAI_TRANSPOSED = {"visual.proj", "text_projection"}
OPENAI_METADATA = {
    "input_resolution",
    "context_length",
    "vocab_size",
}  # ints in OpenAI's archives, not weights
# Non-weight buffers of the same layout: open_clip's `CLIP` registers its causal text mask as `attn_mask`
# (non-persistent, but `torch.jit.script` archives keep every buffer). stanvid builds its own mask.
OPENAI_BUFFERS = {"attn_mask"}

HF_RULES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.patch_embed.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    *block_rules(r"vision_model\.encoder\.layers", "visual.blocks", BLOCK_HF),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"visual_projection\.weight", "visual.proj.weight"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embed.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
    *block_rules(r"text_model\.encoder\.layers", "text.blocks", BLOCK_HF),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_projection\.weight", "text.proj.weight"),
    (r"logit_scale", "logit_scale"),
]
HF_BUFFERS = {
    "vision_model.embeddings.position_ids",
    "text_model.embeddings.position_ids",
}  # older transformers

# Official STAN (mmaction `VITCLIPPretrained_STAN` + `CLIPTextPretrained`): Hugging Face modules re-parented.
STAN_RULES: list[tuple[str, str]] = [
    (r"backbone\.class_embedding", "visual.class_embedding"),
    (r"backbone\.patch_embedding\.weight", "visual.patch_embed.weight"),
    (r"backbone\.position_embedding\.weight", "visual.pos_embed"),
    (r"backbone\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    *block_rules(r"backbone\.layers", "visual.blocks", BLOCK_HF),
    (r"backbone\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"backbone\.visual_projection\.weight", "visual.proj.weight"),
    *block_rules(r"backbone\.STAN_S_layers", "temporal.layers", [(p, "spatial." + r) for p, r in BLOCK_HF]),
    (
        r"backbone\.STAN_T_layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)",
        r"temporal.layers.\1.temporal.attn.\2.\3",
    ),
    (
        r"backbone\.STAN_T_layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        r"temporal.layers.\1.temporal.attn.proj.\2",
    ),
    (r"backbone\.STAN_T_layers\.(\d+)\.layer_norm1\.(weight|bias)", r"temporal.layers.\1.temporal.ln.\2"),
    (r"backbone\.STAN_T_layers\.(\d+)\.temporal_fc\.(weight|bias)", r"temporal.layers.\1.temporal.fc.\2"),
    (r"backbone\.STAN_time_embed\.weight", "temporal.time_embed"),
    (r"text_backbone\.text_model\.embeddings\.token_embedding\.weight", "text.token_embed.weight"),
    (r"text_backbone\.text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
    *block_rules(r"text_backbone\.text_model\.encoder\.layers", "text.blocks", BLOCK_HF),
    (r"text_backbone\.text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_backbone\.text_projection\.weight", "text.proj.weight"),
    (r"logit_scale", "logit_scale"),
]
STAN_BUFFERS = {"text_backbone.text_model.embeddings.position_ids"}

# CLIP4Clip (`modules/modeling.py`): OpenAI CLIP under `clip.`, plus its seqTransf head.
CLIP4CLIP_RULES: list[tuple[str, str]] = [
    *[(r"clip\." + pat, rep) for pat, rep in OPENAI_RULES],
    (r"frame_position_embeddings\.weight", "temporal.frame_pos"),
    *block_rules(r"transformerClip\.resblocks", "temporal.blocks", BLOCK_OPENAI),
]
CLIP4CLIP_TRANSPOSED = {"clip." + k for k in OPENAI_TRANSPOSED}
CLIP4CLIP_METADATA = {"clip." + k for k in OPENAI_METADATA | OPENAI_BUFFERS}
# Heads of CLIP4Clip that stanvid does not implement, by a key prefix each one has.
CLIP4CLIP_UNSUPPORTED = {
    "lstm_visual.": "seqLSTM",
    "cross.": "tightTransf",
    "similarity_dense.": "tightTransf",
}

_COMPILED: dict[int, list[tuple[re.Pattern, str]]] = {}


def _compiled(rules: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    key = id(rules)
    if key not in _COMPILED:
        _COMPILED[key] = [(re.compile(pat + r"\Z"), rep) for pat, rep in rules]
    return _COMPILED[key]


def convert_state_dict(
    foreign: dict[str, torch.Tensor],
    rules: list[tuple[str, str]],
    *,
    transposed: set[str] = frozenset(),
    ignored: set[str] = frozenset(),
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map a foreign state dict onto stanvid keys (float32). Unmapped keys raise `CheckpointError`."""
    ours: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in foreign.items():
        if key in ignored:
            continue
        for pattern, rep in _compiled(rules):
            if pattern.match(key):
                new = pattern.sub(rep, key)
                tensor = torch.as_tensor(value)
                if tensor.is_floating_point():
                    tensor = tensor.float()
                ours[new] = tensor.t().contiguous() if key in transposed else tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{source}: {len(unmapped)} unmapped key(s): {', '.join(sorted(unmapped))}")
    return _fuse_qkv(ours, source)


def _fuse_qkv(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Hugging Face `q_proj`/`k_proj`/`v_proj` -> one `qkv` (rows q, then k, then v, as OpenAI's in_proj)."""
    out = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"(.*\.attn)\.(q|k|v)\.(weight|bias)\Z", key)
        if m:
            groups.setdefault(f"{m.group(1)}.qkv.{m.group(3)}", {})[m.group(2)] = value
        else:
            out[key] = value
    for key, parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"{source}: missing {', '.join(missing)} projection(s) for {key}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_converted(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    optional_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """Copy `state` into `model`, checking every key and shape first; returns the keys left at their init.

    Keys under `optional_prefixes` may be absent (a plain CLIP has no temporal module; some checkpoints carry
    no logit scale); any other missing key, any unexpected key and any shape mismatch raises one
    `CheckpointError` that lists them all (`check_converted`).
    """
    missing = check_converted(model, state, source=source, optional_prefixes=optional_prefixes)
    expected = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
    return missing


def check_converted(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    optional_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """The keys of `model` that `state` lacks (all under `optional_prefixes`), or one `CheckpointError`
    listing every unmapped, missing and mis-shaped key. Reads names and shapes only: `model` may be on the
    meta device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    hard_missing = [k for k in missing if not k.startswith(optional_prefixes)]
    if unexpected or hard_missing or misshaped:
        parts = []
        if unexpected:
            parts.append(f"unmapped: {', '.join(sorted(unexpected))}")
        if hard_missing:
            parts.append(f"missing: {', '.join(sorted(hard_missing))}")
        if misshaped:
            parts.append(f"mis-shaped: {', '.join(sorted(misshaped))}")
        raise CheckpointError(f"{source}: checkpoint does not fit the model; " + "; ".join(parts))
    return missing


# ---------------------------------------------------------------------------------------------- configs
def _count_layers(sd: dict[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _require(sd: dict[str, Any], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: missing key {key} (is this the format it looks like?)")
    return sd[key]


def openai_clip_config(
    sd: dict[str, torch.Tensor], prefix: str = "", source: str = "checkpoint"
) -> CLIPConfig:
    """Architecture from an OpenAI state dict, as OpenAI's `build_model` infers it (heads = width // 64)."""
    conv = _require(sd, prefix + "visual.conv1.weight", source)
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round(math.sqrt(_require(sd, prefix + "visual.positional_embedding", source).shape[0] - 1))
    text_width = _require(sd, prefix + "ln_final.weight", source).shape[0]
    vision_mlp = _require(sd, prefix + "visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0]
    text_mlp = _require(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0]
    return CLIPConfig(
        embed_dim=_require(sd, prefix + "text_projection", source).shape[1],
        vision=VisionConfig(
            width=vision_width,
            layers=_count_layers(sd, prefix + "visual.transformer.resblocks"),
            heads=max(1, vision_width // 64),
            patch_size=patch,
            image_size=patch * grid,
            mlp_dim=vision_mlp,
        ),
        text=TextConfig(
            width=text_width,
            layers=_count_layers(sd, prefix + "transformer.resblocks"),
            heads=max(1, text_width // 64),
            context_length=_require(sd, prefix + "positional_embedding", source).shape[0],
            vocab_size=_require(sd, prefix + "token_embedding.weight", source).shape[0],
            mlp_dim=text_mlp,
        ),
    )


_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# Hugging Face CLIPConfig defaults, used for keys that a config.json leaves out (as transformers does).
_HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_HF_TEXT_DEFAULTS = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def hf_clip_config(config: dict[str, Any] | str | Path) -> CLIPConfig:
    """A Hugging Face CLIP `config.json` (dict, file, or directory holding it) -> `CLIPConfig`."""
    where = "Hugging Face config"
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: Hugging Face CLIP config.json not found")
        where = str(path)
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if "vision_config" not in config or "text_config" not in config:
        raise ConfigError(f"{where}: not a Hugging Face CLIP config (no vision_config / text_config)")
    v = {**_HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    t = {**_HF_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    for part, d in (("vision_config", v), ("text_config", t)):
        if d["hidden_act"] not in _HF_ACTS:
            raise ConfigError(
                f"{where}: {part}.hidden_act {d['hidden_act']!r} is not supported; "
                f"supported: {', '.join(_HF_ACTS)}"
            )
    return CLIPConfig(
        embed_dim=int(config.get("projection_dim", 512)),
        vision=VisionConfig(
            width=v["hidden_size"],
            layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"],
            patch_size=v["patch_size"],
            image_size=v["image_size"],
            mlp_dim=v["intermediate_size"],
            act=_HF_ACTS[v["hidden_act"]],
            ln_eps=float(v["layer_norm_eps"]),
        ),
        text=TextConfig(
            width=t["hidden_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            context_length=t["max_position_embeddings"],
            vocab_size=t["vocab_size"],
            mlp_dim=t["intermediate_size"],
            act=_HF_ACTS[t["hidden_act"]],
            ln_eps=float(t["layer_norm_eps"]),
        ),
        logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)),
    )


def hf_preprocess_config(directory: Path) -> PreprocessConfig:
    """`image_mean` / `image_std` of a Hugging Face `preprocessor_config.json` beside the model (OpenAI's if absent)."""
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return PreprocessConfig()
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return PreprocessConfig(
            mean=data.get("image_mean", PreprocessConfig.mean),
            std=data.get("image_std", PreprocessConfig.std),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc})") from exc


# open_clip (`open_clip_config.json` = {"model_cfg": ..., "preprocess_cfg": ...}, as `push_to_hf_hub` writes it).
# Keys stanvid reads, per section; every other key must hold the value under which it changes nothing here,
# or the config is refused naming it (layer scale, attentional pooling, timm / Hugging Face towers, ...).
_OC_MODEL_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale"}
_OC_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "norm_kwargs"}
_OC_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs"}
# (key -> values that are harmless): training-only settings, or the defaults of features stanvid lacks.
_OC_MODEL_NEUTRAL: dict[str, tuple] = {
    "cast_dtype": (None, "fp16", "bf16", "float16", "bfloat16"),  # training precision only
    "custom_text": (False,),
    "init_logit_bias": (None,),
    "nonscalar_logit_scale": (False,),
}
_OC_VISION_NEUTRAL: dict[str, tuple] = {
    "patch_dropout": "any",  # training only
    "output_tokens": "any",
    "ls_init_value": (None,),
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "final_ln_after_pool": (False,),
    "pool_type": ("tok",),
    "act_kwargs": (None, {}),
    "timm_model_name": (None, ""),
    "image_seq_len": (None,),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_OC_TEXT_NEUTRAL: dict[str, tuple] = {
    "output_tokens": "any",
    "pad_id": "any",  # only used with embed_cls
    "text_arch": ("clip",),
    "variable_text": (False,),
    "hf_tokenizer_name": (None, ""),
    "tokenizer_mode": (None,),
    "tokenizer_kwargs": (None, {}),
    "tokenizer_type": ("",),
    "hf_model_name": (None, ""),
    "ls_init_value": (None,),
    "embed_cls": (False,),
    "no_causal_mask": (False,),
    "final_ln_after_pool": (False,),
    "pool_type": ("argmax",),
    "proj_bias": (False,),
    "proj_type": ("linear",),
    "act_kwargs": (None, {}),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_OC_PREPROCESS_KEYS = {"mean", "std", "size", "interpolation", "resize_mode", "fill_color"}


def _check_open_clip_section(
    section: dict[str, Any], read: set[str], neutral: dict[str, tuple], where: str
) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    for key, value in section.items():
        if key in read:
            continue
        allowed = neutral.get(key)
        if allowed is None:
            raise ConfigError(
                f"{where}.{key} is not supported by stanvid (it reads {', '.join(sorted(read))} "
                f"and ignores only settings that change nothing at inference)"
            )
        if allowed != "any" and value not in allowed:
            raise ConfigError(
                f"{where}.{key} = {value!r} is not supported by stanvid (supported: {', '.join(map(repr, allowed))})"
            )


def _norm_eps(section: dict[str, Any], where: str) -> float:
    kwargs = section.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise ConfigError(f"{where}.norm_kwargs: only eps is supported, got {sorted(kwargs)}")
    return float(kwargs.get("eps", 1e-5))


def _positive(section: dict[str, Any], key: str, default: Any, where: str) -> Any:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a positive number, got {value!r}")
    return value


def open_clip_config(config: dict[str, Any], where: str = "open_clip config") -> CLIPConfig:
    """An open_clip `open_clip_config.json` (or a bare `model_cfg`) -> `CLIPConfig`.

    Follows open_clip's `CLIPVisionCfg` / `CLIPTextCfg` defaults for keys a config leaves out: vision heads =
    width / head_width (head_width 64), text heads as given (8), MLP width int(width * mlp_ratio) (ratio 4),
    exact GELU unless `quick_gelu` is true, layer norm eps 1e-5; `preprocess_cfg` mean/std become
    `CLIPConfig.preprocess` (OpenAI's values where absent, as open_clip's default).
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    model_cfg = config.get("model_cfg", config)
    if isinstance(model_cfg, dict) and "multimodal_cfg" in model_cfg:
        raise ConfigError(f"{where}: model_cfg.multimodal_cfg (CoCa) is not supported")
    _check_open_clip_section(model_cfg, _OC_MODEL_KEYS, _OC_MODEL_NEUTRAL, f"{where}: model_cfg")
    for part in ("vision_cfg", "text_cfg"):
        if part not in model_cfg:
            raise ConfigError(f"{where}: model_cfg has no {part} (is this an open_clip CLIP config?)")
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    vw = f"{where}: model_cfg.vision_cfg"
    tw = f"{where}: model_cfg.text_cfg"
    _check_open_clip_section(v, _OC_VISION_KEYS, _OC_VISION_NEUTRAL, vw)
    _check_open_clip_section(t, _OC_TEXT_KEYS, _OC_TEXT_NEUTRAL, tw)
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise ConfigError(f"{vw}.layers is a list: ResNet CLIP towers are not supported (ViT only)")
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ConfigError(f"{vw}.image_size {image_size!r}: only square images are supported")
        image_size = image_size[0]
    width = _positive(v, "width", 768, vw)
    head_width = _positive(v, "head_width", 64, vw)
    if width % head_width:
        raise ConfigError(f"{vw}: width {width} is not a multiple of head_width {head_width}")
    quick_gelu = model_cfg.get("quick_gelu", False)
    if not isinstance(quick_gelu, bool):
        raise ConfigError(f"{where}: model_cfg.quick_gelu must be true or false, got {quick_gelu!r}")
    act = "quick_gelu" if quick_gelu else "gelu"  # open_clip's default is exact GELU (nn.GELU)
    text_width = _positive(t, "width", 512, tw)
    preprocess = config.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise ConfigError(f"{where}: preprocess_cfg must be a mapping")
    unknown = sorted(set(preprocess) - _OC_PREPROCESS_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown preprocess_cfg key(s) {', '.join(unknown)}")
    try:
        clip = CLIPConfig(
            embed_dim=_positive(model_cfg, "embed_dim", 512, f"{where}: model_cfg"),
            vision=VisionConfig(
                width=width,
                layers=v.get("layers", 12),
                heads=width // head_width,
                patch_size=v.get("patch_size", 16),
                image_size=image_size,
                mlp_dim=int(width * _positive(v, "mlp_ratio", 4.0, vw)),
                act=act,
                ln_eps=_norm_eps(v, vw),
            ),
            text=TextConfig(
                width=text_width,
                layers=t.get("layers", 12),
                heads=t.get("heads", 8),
                context_length=t.get("context_length", 77),
                vocab_size=t.get("vocab_size", 49408),
                mlp_dim=int(text_width * _positive(t, "mlp_ratio", 4.0, tw)),
                act=act,
                ln_eps=_norm_eps(t, tw),
            ),
            logit_scale_init=float(model_cfg.get("init_logit_scale", 2.6592)),
            preprocess=PreprocessConfig(
                mean=preprocess.get("mean", PreprocessConfig.mean),
                std=preprocess.get("std", PreprocessConfig.std),
            ),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return clip


def open_clip_preprocess_notes(config: dict[str, Any]) -> list[str]:
    """What of an open_clip `preprocess_cfg` stanvid's frame pipeline (bicubic short side, centre crop) differs from."""
    pre = config.get("preprocess_cfg") or {}
    notes = []
    if pre.get("resize_mode", "shortest") != "shortest":
        notes.append(f"resize_mode {pre['resize_mode']!r} (stanvid resizes the short side and centre-crops)")
    if pre.get("interpolation", "bicubic") != "bicubic":
        notes.append(f"interpolation {pre['interpolation']!r} (stanvid resizes bicubic)")
    return notes


def clip_config_from(config: CLIPConfig | dict[str, Any] | str | os.PathLike) -> CLIPConfig:
    """`config=` of `load_model`: a Hugging Face CLIP `config.json` or an open_clip `open_clip_config.json`
    (a dict, the file, or a directory holding either; a directory with both is read as open_clip), or a
    `stanvid.CLIPConfig`. A whole `ModelConfig` is refused rather than half used: its temporal part is what
    `load_model`'s overrides set."""
    if isinstance(config, CLIPConfig):
        return config
    if isinstance(config, ModelConfig):
        raise ConfigError(
            "config= takes the CLIP's configuration (config.clip, a config.json, an open_clip_config.json or "
            "a dict), not a ModelConfig: pass config=cfg.clip and the temporal settings as overrides "
            "(temporal=, stan_depth=, num_frames=, ...), or build it with stanvid.create_model(cfg)"
        )
    if isinstance(config, dict):
        if "model_cfg" in config or "vision_cfg" in config:
            return open_clip_config(config)
        return hf_clip_config(config)
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config= must be a path, a dict or a CLIPConfig, got {type(config).__name__}")
    path = Path(config)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return clip_config_from(path / "open_clip_config.json")
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: config not found (a config.json, an open_clip_config.json or a folder)")
    data = read_json(path)
    if isinstance(data, dict) and ("model_cfg" in data or "vision_cfg" in data):
        return open_clip_config(data, str(path))
    return replace(hf_clip_config(path), preprocess=hf_preprocess_config(path.parent))


def _prefix_tokens(cfg: CLIPConfig) -> int:
    """Tokens before the patches in the image tower: CLIP's class token, PE-Core's if it has one, none on SigLIP."""
    if cfg.family == "siglip":
        return 0
    return 1 if cfg.family == "clip" or cfg.vision.class_token else 0


def check_clip_shapes(cfg: CLIPConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    """Catch a config that disagrees with the weights before building anything (names the key)."""
    checks = {
        "visual.patch_embed.weight": (cfg.vision.width, 3, cfg.vision.patch_size, cfg.vision.patch_size),
        "visual.pos_embed": (cfg.vision.num_patches + _prefix_tokens(cfg), cfg.vision.width),
        "text.pos_embed": (cfg.text.context_length, cfg.text.width),
        "text.token_embed.weight": (cfg.text.vocab_size, cfg.text.width),
        "visual.proj.weight": (cfg.embed_dim, cfg.vision.width),
        "text.proj.weight": (cfg.embed_dim, cfg.text.width),
    }
    bad = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, config {shape})"
        for k, shape in checks.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if bad:
        raise CheckpointError(f"{source}: weights do not fit the config: mis-shaped: {', '.join(bad)}")


def stan_branch_config(sd: dict[str, torch.Tensor]) -> STANConfig | None:
    """STAN depth, temporal module and frame table size from converted (stanvid-keyed) weights, or None."""
    depth = _count_layers(sd, "temporal.layers")
    if depth == 0:
        return None
    conv_key = "temporal.layers.0.temporal.conv.weight"
    if conv_key in sd:
        w = sd[conv_key]
        return STANConfig(
            depth=depth,
            time_module="conv",
            kernel_size=tuple(w.shape[2:]),
            depthwise=w.shape[1] == 1 and w.shape[0] > 1,
            max_frames=sd["temporal.time_embed"].shape[0],
        )
    return STANConfig(depth=depth, time_module="selfattn", max_frames=sd["temporal.time_embed"].shape[0])


def seq_config(sd: dict[str, torch.Tensor]) -> SeqTransfConfig | None:
    if "temporal.frame_pos" not in sd:
        return None
    return SeqTransfConfig(
        layers=_count_layers(sd, "temporal.blocks"), max_frames=sd["temporal.frame_pos"].shape[0]
    )


def model_config_for(clip: CLIPConfig, sd: dict[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """The model a converted checkpoint describes, then the user's overrides on top."""
    stan = stan_branch_config(sd)
    seq = seq_config(sd)
    if stan is not None:
        base = ModelConfig(clip=clip, temporal="stan", stan=stan, num_frames=min(12, stan.max_frames))
    elif seq is not None:
        base = ModelConfig(clip=clip, temporal="seqTransf", seq=seq, pooling="normalized_mean")
    else:  # a plain CLIP: frame pooling until the user asks for a temporal module
        base = ModelConfig(clip=clip, temporal="meanP")
    return base.replace(**overrides)


# ---------------------------------------------------------------------------------------------- Mug-STAN
_ADAPTER = re.compile(r"adapter\s*=\s*(None|dict\(([^()]*)\))")


def mug_head_overrides(meta: Any, sd: dict[str, Any], source: str) -> dict[str, Any]:
    """The Mug head an official checkpoint was trained with, as `load_model` overrides (empty: none recorded).

    A Mug-STAN checkpoint has STAN's keys (``backbone.*``, ``text_backbone.*``); its head (``Mug_head``) has no
    weights in the modes the official configs use. What the head was is in the config text mmengine stores under
    ``meta['cfg']`` (``adapter=dict(type='Mug_head', input_dim=512, tau=100)``, mode by default
    ``mug_frame_token_simple``), when the checkpoint kept it; otherwise pass ``similarity="mug"`` to
    `load_model`. Weights under ``adapter.*`` (the ``drl_wti`` mode's two linear layers) are refused by name:
    stanvid does not implement that mode (see `stanvid.models.mug`).
    """
    head_keys = sorted(k for k in sd if k.startswith("adapter."))
    if head_keys:
        raise CheckpointError(
            f"{source}: the checkpoint carries alignment-head weights ({', '.join(head_keys)}): the Mug head's "
            f"drl_wti mode, which stanvid does not implement (it supports mug_frame_token_simple, "
            f"mug_frame_token and mug_frame_text, which have no weights)"
        )
    text = meta.get("cfg") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return {}
    found = _ADAPTER.search(text)
    if found is None or found.group(1) == "None" or "Mug_head" not in found.group(2):
        return {}
    args = found.group(2)
    overrides: dict[str, Any] = {"similarity": "mug"}
    mode = re.search(r"mode\s*=\s*['\"]([A-Za-z_]+)['\"]", args)
    if mode is not None:
        overrides["mug_mode"] = mode.group(1)  # validated by ModelConfig (drl_wti fails there, by name)
    tau = re.search(r"\btau\s*=\s*([0-9.eE+-]+)", args)
    if tau is not None:
        try:
            overrides["mug_tau"] = float(tau.group(1))
        except ValueError as exc:
            raise CheckpointError(
                f"{source}: meta['cfg'] has an unreadable Mug_head tau {tau.group(1)!r}"
            ) from exc
    return overrides
