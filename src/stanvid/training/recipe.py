"""Run recipes: the dataclasses that specify a training or evaluation run completely, loaded from YAML.

A recipe file (``configs/*.yaml``) has six parts: ``name``, ``task``, and the sections ``model``, ``data``,
``optim``, ``train``, ``eval``. Every key is checked when the file is loaded: an unknown key fails with the
valid keys of its section, a wrong type or an invalid value fails with the field's name and its valid choices
or range, so a typo never surfaces hours into a run. Keys a file leaves out take the defaults below, which are
the official MSR-VTT ViT-B/32 recipe (``configs/exp/stan/stan_msrvtt_b32_hf.py`` in farewellthree/STAN).

``load_recipe(path, overrides=["optim.lr=1e-5", ...])`` applies command-line overrides (``--set a.b=value``)
before validation; each value is read with YAML's scalar rules (``true``, ``null``, ``1e-5``, ``[0.9, 0.98]``).
YAML 1.1, which PyYAML follows, reads ``2e-6`` (no dot) as a string; recipes use YAML 1.2's rule instead and
read it as a number, in files and overrides alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from stanvid.data.datasets import DATASET_NAMES, dataset_task
from stanvid.errors import ConfigError
from stanvid.models.config import MUG_MODES, SIMILARITIES, TEMPORAL_MODULES, TIME_MODULES, STANConfig

__all__ = [
    "Recipe",
    "ModelRecipe",
    "DataRecipe",
    "OptimRecipe",
    "TrainRecipe",
    "EvalRecipe",
    "load_recipe",
    "parse_override",
    "TASKS",
    "DATASETS",
]

TASKS = ("retrieval", "recognition")
# data.dataset name -> the task it serves (None: either): a view of the one dataset table,
# `stanvid.data.datasets.DATASETS`, which also holds each dataset's reader
DATASETS: dict[str, str | None] = {name: dataset_task(name) for name in DATASET_NAMES}
SAMPLERS = ("uniform", "dense")
CLASSIFIERS = ("text", "linear")
NO_DECAY = ("clip_norm_bias", "norm_bias", "none")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
ACCUMULATIONS = ("exact", "independent")
LOSSES = ("infonce", "sigmoid")  # retrieval: the paper's symmetric InfoNCE, or SigLIP's sigmoid loss
VIEW_AVERAGES = ("prob", "score")
LEARNABLE = "learnable"


def _f(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with validation rules in its metadata: choices, gt, ge, le, nonempty, required."""
    return field(default=default, metadata=rules)


class _Validated:
    """Recipe sections check themselves when built, from a file or in code alike: every field gets a value of
    its declared type (an int where a float is declared becomes that float) or a `ConfigError` naming it,
    then its rules (`_f`) are checked."""

    def __post_init__(self) -> None:
        where = _SECTION_NAMES.get(type(self), "")
        _coerce_fields(self, where)
        _check_rules(self, where)


@dataclass
class ModelRecipe(_Validated):
    """Which model to train or evaluate.

    ``source`` is anything `stanvid.load_model` reads: an OpenAI CLIP name or ``.pt`` file, a Hugging Face CLIP
    directory, an official STAN ``.pth``, a CLIP4Clip checkpoint, or a directory written by ``save_pretrained``.
    The remaining fields are `load_model`'s overrides. ``num_frames: null`` takes ``data.num_frames``.
    """

    source: str = _f("ViT-B/32", nonempty=True)
    temporal: str = _f("stan", choices=TEMPORAL_MODULES)
    stan_depth: int = _f(4, gt=0)
    time_module: str = _f("selfattn", choices=TIME_MODULES)
    num_frames: int | None = _f(None, gt=0)
    grad_checkpointing: bool = False
    # recognition only: score videos against the class names' text embeddings (the official model) or a
    # linear head on the video embedding
    classifier: str = _f("text", choices=CLASSIFIERS)
    # retrieval: `cosine` of pooled embeddings (STAN) or `mug`, Mug-STAN's token-by-frame head (stanvid.models.mug),
    # with the official head's mode and softmax temperature; recorded in the saved model's config
    similarity: str = _f("cosine", choices=SIMILARITIES)
    mug_mode: str = _f("mug_frame_token_simple", choices=MUG_MODES)
    mug_tau: float = _f(100.0, gt=0)


@dataclass(kw_only=True)
class DataRecipe(_Validated):
    """Where the data is and how clips are sampled and transformed.

    Relative paths (annotations, captions, class names, video folders) are relative to ``root``, and a relative
    ``root`` to the working directory, so ``--set data.root=/datasets/msrvtt`` re-points a whole recipe.

    ``dataset: webdataset`` reads tar shards (`stanvid.data.shard_dataset`): the annotations are a brace pattern
    (``shards/{00000..00999}.tar``), a list of them, or a shard index ``.json``; ``pipe:COMMAND`` and URLs are
    streamed for training. ``caption_key`` / ``label_key`` name the ``.json`` key of a sample's caption / label
    (null: its ``.txt`` / ``.cls``), ``shuffle_buffer`` the samples each reader shuffles among.
    """

    dataset: str = _f(choices=DATASET_NAMES, required=True)
    root: str = _f(".", nonempty=True)
    train_annotations: str | list[str] | None = None
    test_annotations: str | list[str] | None = None
    captions: str | None = None  # caption file, for layouts that keep captions apart from the splits
    class_names: str | None = None  # recognition: the class list (one name per line, or the dataset's json)
    video_dir: str = "videos"
    test_video_dir: str | None = None  # null: the same as video_dir
    num_frames: int = _f(12, gt=0)
    test_num_frames: int | None = _f(None, gt=0)  # null: num_frames (Mug-STAN MSR-VTT tests on 32)
    sampler: str = _f("uniform", choices=SAMPLERS)
    frame_interval: int = _f(1, gt=0)  # dense sampler only
    input_size: int = _f(224, gt=0)
    train_resize: int = _f(256, gt=0)  # short side before the random resized crop
    random_crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the frame area
    random_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range
    test_resize: int = _f(224, gt=0)  # short side before the centre crop(s)
    text_length: int = _f(32, gt=0)
    flip: bool = False  # random horizontal flip in training
    num_workers: int = _f(8, ge=0)
    caption_key: str | None = None  # webdataset: .json key of the caption (null: the .txt member)
    label_key: str | None = None  # webdataset: .json key of the label (null: the .cls member)
    shuffle_buffer: int = _f(100, gt=0)  # webdataset: samples per reader's shuffle buffer (1: none)

    def path(self, value: str) -> Path:
        """``value`` resolved against ``root`` (absolute paths are kept)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.root).expanduser() / p


@dataclass
class OptimRecipe(_Validated):
    """AdamW with two learning rates, warmup, schedule, clipping, accumulation.

    ``no_decay`` picks which parameters get no weight decay. ``clip_norm_bias`` is what the official code does:
    mmengine's ``norm_decay_mult=0, bias_decay_mult=0`` exempt CLIP's layer norms and biases, but a parameter
    matched by ``custom_keys={'STAN': ...}`` skips those rules, so the STAN branch's norms and biases *are*
    decayed. ``norm_bias`` exempts every norm and bias; ``none`` decays everything.

    The learning-rate factor rises linearly from ``warmup_start_factor`` to 1 over ``warmup_epochs`` (per step),
    then follows ``schedule``: ``constant``, or ``cosine`` from 1 towards ``min_lr_ratio`` with a half period of
    ``cosine_epochs`` (null: the epochs left after warmup). As in mmengine's ``CosineAnnealingLR``, a half period
    shorter than the epochs left makes the factor rise again afterwards. The official retrieval recipes use
    ``warmup_epochs = epochs`` (a 0.05x -> 1x ramp over the whole run; their cosine stage never starts).

    ``accumulation_steps`` micro-batches make one optimizer step. For the contrastive losses of retrieval,
    ``accumulation: exact`` (the default) makes that step the one of a single batch holding all of them (and
    of all ranks): every caption is scored against every video of the global batch, at the memory of one
    micro-batch plus the cached embeddings (`stanvid.training.trainer.Trainer.accumulate_exact`, GradCache;
    about one more forward pass per micro-batch). ``independent`` is the old behaviour: each micro-batch is its
    own contrastive problem (negatives from that micro-batch only) and the gradients are averaged; it is kept
    to reproduce runs made with it. Recognition's cross-entropy is per video, so both mean the same there.
    """

    lr: float = _f(2e-6, gt=0)
    new_param_lr_mult: float = _f(10.0, gt=0)  # model.is_new_parameter(name): the STAN branch, seqTransf
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = _f(1e-8, gt=0)
    weight_decay: float = _f(0.05, ge=0)
    no_decay: str = _f("clip_norm_bias", choices=NO_DECAY)
    schedule: str = _f("cosine", choices=SCHEDULES)
    warmup_epochs: float = _f(10.0, ge=0)
    warmup_start_factor: float = _f(0.05, gt=0, le=1)
    cosine_epochs: float | None = _f(None, gt=0)
    hold_epochs: float = _f(0.0, ge=0)  # factor 1 between the ramp and the cosine (Mug-STAN LSMDC: 5)
    min_lr_ratio: float = _f(0.0, ge=0, le=1)
    grad_clip: float | None = _f(5.0, gt=0)  # max global L2 norm; null: no clipping
    accumulation_steps: int = _f(1, gt=0)
    accumulation: str = _f("exact", choices=ACCUMULATIONS)


@dataclass
class TrainRecipe(_Validated):
    """The training run.

    ``temperature`` is the fixed tau of the contrastive loss (logit scale ``1 / tau``), as the official recipes
    set it, or ``learnable`` to train CLIP's ``logit_scale``. ``batch_size`` is per process (GPU).

    ``loss`` (retrieval): ``infonce``, the paper's symmetric InfoNCE, or ``sigmoid``, SigLIP's pairwise sigmoid
    loss with a learned logit bias (the checkpoint's, or -10 for a model that has none; the scale follows
    ``temperature``, and SigLIP learns it: ``learnable``). Not with the Mug head.

    ``precision``: ``fp32``; ``bf16`` autocast (on CUDA where the GPU has it, on a CPU with native bf16,
    AVX512_BF16 or AMX; elsewhere the run trains in fp32 and says so); ``fp16`` autocast with a loss scaler
    (`torch.amp.GradScaler`, on CUDA and on the CPU alike: steps whose gradients overflow are skipped and
    counted in the log). The weights stay float32 in every case.

    ``dist_timeout_minutes``: how long a collective (NCCL or gloo) may wait for the other ranks before the run
    fails, instead of hanging; passed to ``init_process_group`` when `fit` starts the process group itself.
    """

    epochs: int = _f(10, gt=0)
    batch_size: int = _f(16, gt=0)
    precision: str = _f("fp32", choices=PRECISIONS)
    temperature: float | str = _f(0.01, gt=0)
    loss: str = _f("infonce", choices=LOSSES)
    checkpoint_every: int = _f(1000, ge=0)  # steps; 0: only at the end of each epoch
    keep_checkpoints: int = _f(2, gt=0)  # step checkpoints kept (the newest)
    eval_every: int = _f(1, ge=0)  # epochs; 0: only after the last one
    max_steps: int | None = _f(None, gt=0)  # stop early (smoke tests); the schedule still follows `epochs`
    output_dir: str = _f("runs/stan", nonempty=True)
    seed: int = _f(0, ge=0)
    log_every: int = _f(10, gt=0)
    tensorboard: bool = False
    dist_timeout_minutes: float = _f(30.0, gt=0)


@dataclass
class EvalRecipe(_Validated):
    """Evaluation: batch size, dual-softmax re-ranking (reported beside the plain numbers), similarity chunks,
    recognition test views (``num_clips`` temporal x ``num_crops`` spatial, averaged per ``view_average``)."""

    batch_size: int = _f(16, gt=0)
    dsl: bool = True
    dsl_temperature: float = _f(0.01, gt=0)  # in cosine units: 0.01 = softmax of the 100x-scaled scores
    chunk_size: int = _f(1024, gt=0)
    num_clips: int = _f(1, gt=0)
    num_crops: int = _f(1, choices=(1, 3))
    view_average: str = _f("prob", choices=VIEW_AVERAGES)


@dataclass(kw_only=True)
class Recipe:
    """A complete run: `load_recipe` builds it from YAML; `to_dict` / `to_yaml` print it resolved.

    Built in code or from a file, a recipe is validated on construction (each section by its own
    ``__post_init__``, then the rules that involve several sections), so an invalid one never exists.
    """

    task: str = _f(choices=TASKS, required=True)
    name: str = ""
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = _f(required=True)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)

    def __post_init__(self) -> None:
        for name, section in _SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise ConfigError(
                    f"{name} must be a {section.__name__}, got {type(getattr(self, name)).__name__}"
                )
        _coerce_fields(self, "")
        _check_rules(self, "")
        _check_recipe(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Recipe:
        """Build and validate a recipe from a plain mapping (as `to_dict` gives, or a YAML document)."""
        return _build(cls, data, where)


def field_default(key: str) -> Any:
    """The default of a dotted recipe key (``data.shuffle_buffer``), or None: what a recipe written before the
    key existed ran with."""
    section, _, name = key.partition(".")
    cls = _SECTIONS.get(section)
    for f in fields(cls) if cls is not None else ():
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return _plain(f.default_factory())
            return None if f.default is dataclasses.MISSING else _plain(f.default)
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- YAML ----------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (``2e-6``, ``1E+3``) as numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, short lists (betas, crop ranges) inline: ``betas: [0.9, 0.98]``."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from exc


# ---- building and checking -----------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "model": ModelRecipe,
    "data": DataRecipe,
    "optim": OptimRecipe,
    "train": TrainRecipe,
    "eval": EvalRecipe,
}
_SECTION_NAMES = {section: name for name, section in _SECTIONS.items()}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in typing.get_args(tp) else text
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}s".replace("a strings", "strings")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where} must be {_describe(tp)} (not empty), got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported recipe field type {tp!r} at {where}")
    if not ok:
        raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    place = f"in {where}" if where else "at the top level"
    return ConfigError(f"unknown key {key!r} {place}{hint}; valid keys: {', '.join(valid)}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate a recipe dataclass from a mapping; `where` is the dotted path used in messages."""
    label = where or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of keys to values, got {type(data).__name__}")
    own = [f.name for f in fields(cls)]
    for key in data:
        if key not in own:
            raise _unknown_key(str(key), own, where)
    kwargs = {}
    for f in fields(cls):
        path = _join(where, f.name)
        if f.name not in data:
            if f.metadata.get("required"):
                choices = f.metadata.get("choices")
                hint = f" (one of {', '.join(map(str, choices))})" if choices else ""
                raise ConfigError(f"missing required key {path}{hint}")
            continue
        section = _SECTIONS.get(f.name) if cls is Recipe else None
        kwargs[f.name] = _build(section, data[f.name], path) if section is not None else data[f.name]
    return cls(**kwargs)  # the dataclass validates itself (`_Validated`, `Recipe.__post_init__`)


def _coerce_fields(obj: Any, where: str) -> None:
    """Give every non-section field of ``obj`` a value of its declared type, or raise naming the field."""
    hints = _hints(type(obj))
    for f in fields(obj):
        if type(obj) is Recipe and f.name in _SECTIONS:
            continue
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], _join(where, f.name)))


def _check_rules(obj: Any, where: str) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        rules = f.metadata
        path = _join(where, f.name)
        if value is None or isinstance(value, (dict, list)) or dataclasses.is_dataclass(value):
            continue
        if "choices" in rules and value not in rules["choices"]:
            valid = ", ".join(map(str, rules["choices"]))
            raise ConfigError(f"{path}: {value!r} is not a valid choice; valid choices: {valid}")
        if rules.get("nonempty") and not str(value).strip():
            raise ConfigError(f"{path} must not be empty")
        if isinstance(value, str):  # numeric rules do not apply to a string alternative (temperature)
            continue
        for rule, test, text in (
            ("gt", lambda v, b: v > b, ">"),
            ("ge", lambda v, b: v >= b, ">="),
            ("le", lambda v, b: v <= b, "<="),
        ):
            if rule in rules and not test(value, rules[rule]):
                raise ConfigError(f"{path} must be {text} {rules[rule]}, got {value!r}")


def _check_pair(values: tuple[float, float], path: str, low: float, high: float | None) -> None:
    a, b = values
    top = "inf" if high is None else high
    if not (low <= a <= b and (high is None or b <= high)):
        raise ConfigError(f"{path} must be [min, max] with {low} <= min <= max <= {top}, got {list(values)}")


def _check_recipe(r: Recipe) -> None:
    """Rules that involve several fields; fills the `null`s that take another field's value."""
    kind = DATASETS[r.data.dataset]
    if kind is not None and kind != r.task:
        serves = [name for name, task in DATASETS.items() if task in (r.task, None)]
        raise ConfigError(
            f"data.dataset {r.data.dataset!r} is a {kind} dataset but task is {r.task!r}; "
            f"datasets for {r.task}: {', '.join(serves)}"
        )
    if r.task == "recognition" and r.model.similarity != "cosine":
        raise ConfigError("model.similarity: mug is a retrieval head; recognition recipes keep cosine")
    if r.train.loss == "sigmoid" and r.task != "retrieval":
        raise ConfigError(
            "train.loss: sigmoid is a retrieval loss; recognition trains with cross-entropy (leave train.loss "
            "at infonce)"
        )
    if r.train.loss == "sigmoid" and r.model.similarity == "mug":
        raise ConfigError(
            "train.loss: sigmoid is not available with the Mug head (model.similarity: mug), which trains with "
            "InfoNCE over its token-by-frame scores; use train.loss: infonce or model.similarity: cosine"
        )
    if r.task == "recognition" and not r.data.class_names:
        raise ConfigError("data.class_names is required for recognition (the class list file)")
    if isinstance(r.train.temperature, str) and r.train.temperature != LEARNABLE:
        raise ConfigError(
            f"train.temperature must be a positive number (tau) or {LEARNABLE!r}, got {r.train.temperature!r}"
        )
    _check_pair(r.optim.betas, "optim.betas", 0.0, 1.0)
    if max(r.optim.betas) >= 1.0:
        raise ConfigError(f"optim.betas must be below 1, got {list(r.optim.betas)}")
    _check_pair(r.data.random_crop_area, "data.random_crop_area", 0.0, 1.0)
    if r.data.random_crop_area[1] <= 0:
        raise ConfigError(
            f"data.random_crop_area must allow a non-empty crop, got {list(r.data.random_crop_area)}"
        )
    _check_pair(r.data.random_crop_ratio, "data.random_crop_ratio", 1e-6, None)
    if r.data.test_resize < r.data.input_size:
        raise ConfigError(
            f"data.test_resize ({r.data.test_resize}) must be at least data.input_size ({r.data.input_size}): "
            "the test crop is cut from the resized frame"
        )
    if r.task == "recognition" and r.eval.num_crops == 3 and r.data.test_resize != r.data.input_size:
        raise ConfigError(
            f"eval.num_crops 3 needs data.test_resize = data.input_size ({r.data.input_size}), got "
            f"{r.data.test_resize}: the three crops tile the longer side of a frame resized to the crop size "
            "(mmaction2's ThreeCrop)"
        )
    if r.optim.warmup_epochs + r.optim.hold_epochs > r.train.epochs:
        raise ConfigError(
            f"optim.warmup_epochs ({r.optim.warmup_epochs}) + optim.hold_epochs ({r.optim.hold_epochs}) "
            f"must not exceed train.epochs ({r.train.epochs})"
        )
    if r.model.num_frames is None:
        r.model.num_frames = r.data.num_frames
    max_frames = STANConfig().max_frames
    if r.model.temporal == "stan" and r.model.num_frames > max_frames:
        raise ConfigError(
            f"model.num_frames ({r.model.num_frames}) exceeds STAN's time embedding ({max_frames} frames)"
        )
    if r.model.temporal == "stan" and r.data.num_frames > max_frames:
        raise ConfigError(
            f"data.num_frames ({r.data.num_frames}) exceeds STAN's time embedding ({max_frames})"
        )
    if r.model.temporal == "stan" and (r.data.test_num_frames or 0) > max_frames:
        raise ConfigError(
            f"data.test_num_frames ({r.data.test_num_frames}) exceeds STAN's time embedding ({max_frames})"
        )


# ---- overrides and loading -----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-5"`` -> ``(["optim", "lr"], 1e-05)``; the value is read with YAML's scalar rules."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-5)")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    return parts, _yaml_load(raw, f"override {text!r}")


def _apply_override(data: dict[str, Any], text: str) -> None:
    parts, value = parse_override(text)
    cls: type | None = Recipe
    node = data
    for depth, name in enumerate(parts):
        where = ".".join(parts[:depth])
        valid = [f.name for f in fields(cls)]
        if name not in valid:
            raise ConfigError(f"override {text!r}: " + str(_unknown_key(name, valid, where)))
        last = depth == len(parts) - 1
        section = _SECTIONS.get(name) if cls is Recipe else None
        if last:
            if section is not None:
                raise ConfigError(
                    f"override {text!r}: {name} is a section; set one of its keys "
                    f"({', '.join(f.name for f in fields(section))})"
                )
            node[name] = value
        else:
            if section is None:
                raise ConfigError(f"override {text!r}: {_join(where, name)} is a value, not a section")
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{_join(where, name)} must be a mapping, got {type(child).__name__}")
            node, cls = child, section


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply ``a.b=value`` overrides in order, validate, and return the `Recipe`.

    Raises `ConfigError` naming the file and the key (with the valid keys or choices) on any problem.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: recipe file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror})") from exc
    data = _yaml_load(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    try:
        return Recipe.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
