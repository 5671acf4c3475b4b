"""Model configuration as plain dataclasses.

Every value is checked when the config is built (`__post_init__`), so a bad value fails at load time with the
field's name, never deep inside a forward pass. `to_dict` / `from_dict` give the JSON written next to the
weights by `save_pretrained`; `from_dict` rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stanvid.errors import ConfigError
from stanvid.fileio import atomic_write_text
from stanvid.video.transforms import CLIP_MEAN, CLIP_STD

ACTIVATIONS = ("quick_gelu", "gelu")
TEMPORAL_MODULES = ("meanP", "seqTransf", "stan")
TIME_MODULES = ("selfattn", "conv")
POOLINGS = ("mean", "normalized_mean")
# how a text is scored against a video: the cosine of pooled embeddings, or Mug-STAN's token-by-frame head
SIMILARITIES = ("cosine", "mug")
# the official `Mug_head` modes stanvid implements (see stanvid.models.mug; `drl_wti` is left out, see there)
MUG_MODES = ("mug_frame_token_simple", "mug_frame_token", "mug_frame_text")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(obj: Any, *names: str, ok: Callable[[Any], bool], expected: str) -> None:
    """A `ConfigError` naming the first of ``names`` whose value fails ``ok``. The values must already have
    their types: a YAML/JSON "false" is a str, and `bool("false")` would be True."""
    for name in names:
        value = getattr(obj, name)
        if not ok(value):
            raise ConfigError(f"{type(obj).__name__}.{name} must be {expected}, got {value!r}")


_positive_int = functools.partial(
    _check_fields, ok=lambda v: _is_int(v) and v > 0, expected="a positive integer"
)
_bools = functools.partial(_check_fields, ok=lambda v: isinstance(v, bool), expected="true or false")
_numbers = functools.partial(_check_fields, ok=_is_number, expected="a number")
_strings = functools.partial(_check_fields, ok=lambda v: isinstance(v, str), expected="a string")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {', '.join(choices)}; got {value!r}")


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        kwargs[name] = _from_dict(sub, value, f"{where}.{name}") if sub is not None else value
    if "kernel_size" in kwargs and isinstance(kwargs["kernel_size"], list):
        kwargs["kernel_size"] = tuple(kwargs["kernel_size"])
    return cls(**kwargs)


@dataclass
class VisionConfig:
    """CLIP ViT image tower. Defaults are ViT-B/32."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 32
    image_size: int = 224
    mlp_dim: int | None = None  # None: 4 * width, as in every released CLIP
    act: str = "quick_gelu"
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        _positive_int(self, "width", "layers", "heads", "patch_size", "image_size")
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.width
        _positive_int(self, "mlp_dim")
        _choice(self, "act", ACTIVATIONS)
        _numbers(self, "ln_eps")
        if self.width % self.heads:
            raise ConfigError(f"VisionConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass
class TextConfig:
    """CLIP text transformer (causal). Defaults are the 512-wide text tower of ViT-B/32 and B/16."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    mlp_dim: int | None = None
    act: str = "quick_gelu"
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        _positive_int(self, "width", "layers", "heads", "context_length", "vocab_size")
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.width
        _positive_int(self, "mlp_dim")
        _choice(self, "act", ACTIVATIONS)
        _numbers(self, "ln_eps")
        if self.width % self.heads:
            raise ConfigError(f"TextConfig.width ({self.width}) must be divisible by heads ({self.heads})")


@dataclass
class PreprocessConfig:
    """How frames are normalized, `(x / 255 - mean) / std` per RGB channel: as the CLIP was trained.

    OpenAI's values by default; open_clip and Hugging Face checkpoints record theirs (open_clip's ViT-L-14
    `laion2b_s32b_b82k`, for one, was trained with mean = std = 0.5), and `stanvid index` normalizes with these.
    """

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ConfigError(f"PreprocessConfig.{name} must be three numbers (R, G, B), got {value!r}")
            setattr(self, name, tuple(float(v) for v in value))
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"PreprocessConfig.std must be positive, got {self.std!r}")


@dataclass
class CLIPConfig:
    """The image-text model that the video model is built on."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # SigLIP's learned logit bias of the sigmoid loss: None, the model has none (CLIP); a number, it has one
    logit_bias_init: float | None = None

    def __post_init__(self) -> None:
        _positive_int(self, "embed_dim")
        _numbers(self, "logit_scale_init")
        if self.logit_bias_init is not None:
            _numbers(self, "logit_bias_init")


@dataclass
class STANConfig:
    """The STAN branch (paper Sec. 3.2). Defaults follow the official retrieval recipes.

    `kernel_size` and `depthwise` configure only the `conv` temporal module, which the official code names
    but never defines (see `stanvid.models.stan.ConvTemporal` for the choices made there).
    """

    depth: int = 4
    time_module: str = "selfattn"
    max_frames: int = 64  # size of STAN_time_embed in the official code
    drop_path: float = 0.1  # rises linearly from 0 to this over the branch layers
    cls_residue: bool = False
    kernel_size: tuple[int, int, int] = (3, 1, 1)
    depthwise: bool = False

    def __post_init__(self) -> None:
        _positive_int(self, "depth", "max_frames")
        _choice(self, "time_module", TIME_MODULES)
        _bools(self, "cls_residue", "depthwise")
        _numbers(self, "drop_path")
        if not 0.0 <= float(self.drop_path) < 1.0:
            raise ConfigError(f"STANConfig.drop_path must be in [0, 1), got {self.drop_path!r}")
        ks = tuple(self.kernel_size) if isinstance(self.kernel_size, (list, tuple)) else ()
        if len(ks) != 3 or any(
            not isinstance(k, int) or isinstance(k, bool) or k <= 0 or k % 2 == 0 for k in ks
        ):
            raise ConfigError(
                f"STANConfig.kernel_size must be three odd positive integers, got {self.kernel_size!r}"
            )
        self.kernel_size = ks


@dataclass
class SeqTransfConfig:
    """CLIP4Clip's temporal transformer over frame embeddings (`seqTransf`).

    CLIP4Clip builds it with TF-style layer norms (eps 1e-12), heads = width // 64 and a frame position table of
    77 rows whatever the frame count; `heads=None` means width // 64 of the embedding width.
    """

    layers: int = 4
    heads: int | None = None
    max_frames: int = 77
    ln_eps: float = 1e-12

    def __post_init__(self) -> None:
        _positive_int(self, "layers", "max_frames")
        if self.heads is not None:
            _positive_int(self, "heads")
        _numbers(self, "ln_eps")


@dataclass
class ModelConfig:
    """A video-text model: CLIP plus one temporal module.

    `pooling` is part of the model, because the references differ: the official STAN code averages the frame
    embeddings as they are (`mean`), while CLIP4Clip L2-normalizes each frame before the mean
    (`normalized_mean`). A model keeps the rule of the checkpoint it came from, so its outputs reproduce that
    reference exactly, and `save_pretrained` stores it.

    `similarity` says how a caption is scored against a video: `cosine` of the pooled embeddings (STAN), or
    `mug`, Mug-STAN's alignment head over per-token text and per-frame video features (`stanvid.models.mug`), with the
    official head's `mug_mode` and softmax temperature `mug_tau` (100 in every official config).
    """

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    temporal: str = "stan"
    stan: STANConfig = field(default_factory=STANConfig)
    seq: SeqTransfConfig = field(default_factory=SeqTransfConfig)
    num_frames: int = 12
    pooling: str = "mean"
    grad_checkpointing: bool = False
    name: str = ""
    similarity: str = "cosine"
    mug_mode: str = "mug_frame_token_simple"
    mug_tau: float = 100.0

    def __post_init__(self) -> None:
        _choice(self, "temporal", TEMPORAL_MODULES)
        _choice(self, "pooling", POOLINGS)
        _choice(self, "similarity", SIMILARITIES)
        _choice(self, "mug_mode", MUG_MODES)
        _bools(self, "grad_checkpointing")
        _strings(self, "name")
        tau = self.mug_tau
        if not _is_number(tau) or not 0 < tau < float("inf"):
            raise ConfigError(f"ModelConfig.mug_tau must be a positive number, got {tau!r}")
        self.mug_tau = float(tau)
        _positive_int(self, "num_frames")
        if self.temporal == "stan":
            if self.stan.depth > self.clip.vision.layers:
                raise ConfigError(
                    f"STANConfig.depth ({self.stan.depth}) cannot exceed the CLIP vision layers "
                    f"({self.clip.vision.layers}): the branch reads one CLIP layer per branch layer"
                )
            if self.num_frames > self.stan.max_frames:
                raise ConfigError(
                    f"ModelConfig.num_frames ({self.num_frames}) exceeds STANConfig.max_frames ({self.stan.max_frames})"
                )
        if self.temporal == "seqTransf" and self.num_frames > self.seq.max_frames:
            raise ConfigError(
                f"ModelConfig.num_frames ({self.num_frames}) exceeds SeqTransfConfig.max_frames ({self.seq.max_frames})"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stan"]["kernel_size"] = list(self.stan.kernel_size)
        data["clip"]["preprocess"] = {k: list(v) for k, v in data["clip"]["preprocess"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "model config")

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with `load_model`-style overrides applied (temporal, stan_depth, time_module, num_frames, ...).

        `act` sets both towers' activation; `vision_heads` / `text_heads` the head counts; `image_mean` /
        `image_std` the normalization: what an OpenAI-layout state dict cannot record (see `MODEL_OVERRIDES`).
        Each value gets its override's type: a str for a non-str override is parsed as on the command line
        (`grad_checkpointing="false"` is False, as `--set grad_checkpointing=false`), any other wrong type is
        a ConfigError naming the key.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            value = typed_override(key, value)
            for path in MODEL_OVERRIDES[key][0]:
                node = data
                for part in path[:-1]:
                    node = node[part]
                node[path[-1]] = value
        return ModelConfig.from_dict(data)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)


# `load_model` override -> (config paths it sets, parser of its command-line text). One table for both the
# Python keywords and `--set KEY=VALUE`, so a value means the same in either.
MODEL_OVERRIDES: dict[str, tuple[tuple[tuple[str, ...], ...], Any]] = {
    "temporal": ((("temporal",),), str),
    "stan_depth": ((("stan", "depth"),), int),
    "time_module": ((("stan", "time_module"),), str),
    "num_frames": ((("num_frames",),), int),
    "pooling": ((("pooling",),), str),
    "grad_checkpointing": ((("grad_checkpointing",),), _bool),
    "name": ((("name",),), str),
    "act": ((("clip", "vision", "act"), ("clip", "text", "act")), str),
    "vision_heads": ((("clip", "vision", "heads"),), int),
    "text_heads": ((("clip", "text", "heads"),), int),
    "image_mean": ((("clip", "preprocess", "mean"),), _floats),
    "image_std": ((("clip", "preprocess", "std"),), _floats),
    "similarity": ((("similarity",),), str),
    "mug_mode": ((("mug_mode",),), str),
    "mug_tau": ((("mug_tau",),), float),
}
# Overrides that describe the CLIP's architecture: refused for checkpoints that record it themselves.
ARCHITECTURE_OVERRIDES = ("act", "vision_heads", "text_heads")


def parse_model_override(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` (command line) -> (key, typed value) by `MODEL_OVERRIDES`; bad input names the key."""
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    return key, typed_override(key, text, where="--set ")


def typed_override(key: str, value: Any, where: str = "model override ") -> Any:
    """`value` as the type of the model override `key`: a str is parsed by the override's parser (the command
    line's), a value of the right type passes, anything else is a ConfigError naming the key."""
    if key not in MODEL_OVERRIDES:
        raise ConfigError(f"unknown model override {key!r}; valid overrides: {', '.join(MODEL_OVERRIDES)}")
    parse = MODEL_OVERRIDES[key][1]
    kind, accepts = _OVERRIDE_KINDS[parse]
    if isinstance(value, str) and parse is not str:
        try:
            return parse(value.strip())
        except ValueError:
            raise ConfigError(f"{where}{key}: expected {kind}, got {value!r}") from None
    if not accepts(value):
        raise ConfigError(f"{where}{key}: expected {kind}, got {value!r}")
    return value


# override parser -> (what it expects, in words; test of a value given already typed, from Python)
_OVERRIDE_KINDS = {
    str: ("text", lambda v: isinstance(v, str)),
    int: ("an integer", _is_int),
    float: ("a number", _is_number),
    _bool: ("true or false", lambda v: isinstance(v, bool)),
    _floats: ("comma-separated numbers", lambda v: isinstance(v, (list, tuple)) and all(map(_is_number, v))),
}


_NESTED = {
    ("CLIPConfig", "vision"): VisionConfig,
    ("CLIPConfig", "text"): TextConfig,
    ("CLIPConfig", "preprocess"): PreprocessConfig,
    ("ModelConfig", "clip"): CLIPConfig,
    ("ModelConfig", "stan"): STANConfig,
    ("ModelConfig", "seq"): SeqTransfConfig,
}


def clip_preset(name: str) -> CLIPConfig:
    """The architecture of an OpenAI CLIP release by its name (`ViT-B/32`, `ViT-B/16`, `ViT-L/14`)."""
    presets = {
        "ViT-B/32": (
            VisionConfig(width=768, layers=12, heads=12, patch_size=32),
            TextConfig(width=512, heads=8),
            512,
        ),
        "ViT-B/16": (
            VisionConfig(width=768, layers=12, heads=12, patch_size=16),
            TextConfig(width=512, heads=8),
            512,
        ),
        "ViT-L/14": (
            VisionConfig(width=1024, layers=24, heads=16, patch_size=14),
            TextConfig(width=768, heads=12),
            768,
        ),
    }
    if name not in presets:
        raise ConfigError(f"unknown CLIP architecture {name!r}; known: {', '.join(presets)}")
    vision, text, embed_dim = presets[name]
    return CLIPConfig(embed_dim=embed_dim, vision=dataclasses.replace(vision), text=dataclasses.replace(text))
