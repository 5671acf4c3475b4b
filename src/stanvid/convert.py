"""Checkpoint key maps: OpenAI CLIP, Hugging Face CLIP, official STAN and CLIP4Clip -> stanvid.

Each format is a literal list of (foreign-key regex, stanvid key) rules plus a few reshapes (OpenAI stores
projections as `x @ W`, we use `nn.Linear`; Hugging Face splits q/k/v, we fuse them). `convert_state_dict`
maps every key or reports it; `load_converted` then checks the result against the model and raises one
`CheckpointError` listing every unmapped, missing and mis-shaped key. Nothing is silently dropped.

Config inference reads what the weights can tell (widths, depths, patch size, frame tables) the way OpenAI's
`build_model` does; head counts and activations come from a Hugging Face `config.json` where one exists.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from stanvid.config import CLIPConfig, ModelConfig, SeqTransfConfig, STANConfig, TextConfig, VisionConfig
from stanvid.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------------- key maps
_BLOCK_OPENAI = [
    (r"attn\.in_proj_(weight|bias)", r"attn.qkv.\1"),
    (r"attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"ln_1\.(weight|bias)", r"ln_1.\1"),
    (r"ln_2\.(weight|bias)", r"ln_2.\1"),
    (r"mlp\.c_fc\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.c_proj\.(weight|bias)", r"mlp.fc2.\1"),
]
_BLOCK_HF = [
    (r"self_attn\.(q|k|v)_proj\.(weight|bias)", r"attn.\1.\2"),  # fused into attn.qkv by _fuse_qkv
    (r"self_attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"layer_norm1\.(weight|bias)", r"ln_1.\1"),
    (r"layer_norm2\.(weight|bias)", r"ln_2.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"mlp.fc2.\1"),
]


def _blocks(foreign_prefix: str, our_prefix: str, block_rules) -> list[tuple[str, str]]:
    return [
        (rf"{foreign_prefix}\.(\d+)\.{pat}", rf"{our_prefix}.\1.{_shift(rep)}") for pat, rep in block_rules
    ]


def _shift(replacement: str) -> str:
    """Renumber groups by one: the block index is group 1 in the combined pattern."""
    return re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), replacement)


OPENAI_RULES: list[tuple[str, str]] = [
    (r"visual\.conv1\.weight", "visual.patch_embed.weight"),
    (r"visual\.class_embedding", "visual.class_embedding"),
    (r"visual\.positional_embedding", "visual.pos_embed"),
    (r"visual\.ln_pre\.(weight|bias)", r"visual.ln_pre.\1"),
    *_blocks(r"visual\.transformer\.resblocks", "visual.blocks", _BLOCK_OPENAI),
    (r"visual\.ln_post\.(weight|bias)", r"visual.ln_post.\1"),
    (r"visual\.proj", "visual.proj.weight"),  # transposed
    (r"token_embedding\.weight", "text.token_embed.weight"),
    (r"positional_embedding", "text.pos_embed"),
    *_blocks(r"transformer\.resblocks", "text.blocks", _BLOCK_OPENAI),
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

HF_RULES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.patch_embed.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embed"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    *_blocks(r"vision_model\.encoder\.layers", "visual.blocks", _BLOCK_HF),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"visual_projection\.weight", "visual.proj.weight"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embed.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.pos_embed"),
    *_blocks(r"text_model\.encoder\.layers", "text.blocks", _BLOCK_HF),
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
    *_blocks(r"backbone\.layers", "visual.blocks", _BLOCK_HF),
    (r"backbone\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"backbone\.visual_projection\.weight", "visual.proj.weight"),
    *_blocks(r"backbone\.STAN_S_layers", "temporal.layers", [(p, "spatial." + r) for p, r in _BLOCK_HF]),
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
    *_blocks(r"text_backbone\.text_model\.encoder\.layers", "text.blocks", _BLOCK_HF),
    (r"text_backbone\.text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_backbone\.text_projection\.weight", "text.proj.weight"),
    (r"logit_scale", "logit_scale"),
]
STAN_BUFFERS = {"text_backbone.text_model.embeddings.position_ids"}

# CLIP4Clip (`modules/modeling.py`): OpenAI CLIP under `clip.`, plus its seqTransf head.
CLIP4CLIP_RULES: list[tuple[str, str]] = [
    *[(r"clip\." + pat, rep) for pat, rep in OPENAI_RULES],
    (r"frame_position_embeddings\.weight", "temporal.frame_pos"),
    *_blocks(r"transformerClip\.resblocks", "temporal.blocks", _BLOCK_OPENAI),
]
CLIP4CLIP_TRANSPOSED = {"clip." + k for k in OPENAI_TRANSPOSED}
CLIP4CLIP_METADATA = {"clip." + k for k in OPENAI_METADATA}
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
    `CheckpointError` that lists them all.
    """
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
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
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


def check_clip_shapes(cfg: CLIPConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    """Catch a config that disagrees with the weights before building anything (names the key)."""
    checks = {
        "visual.patch_embed.weight": (cfg.vision.width, 3, cfg.vision.patch_size, cfg.vision.patch_size),
        "visual.pos_embed": (cfg.vision.num_patches + 1, cfg.vision.width),
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
    stanvid does not implement that mode (see `stanvid.mug`).
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
