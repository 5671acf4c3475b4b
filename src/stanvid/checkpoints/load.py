"""`load_model`, `create_model`, `save_pretrained`: every checkpoint format in, one format out.

Sources `load_model` accepts, told apart by what they contain (not by file name):
- a stanvid directory (`config.json` with a `clip` section + `model.safetensors`), exact round trip;
- a stanvid ONNX export folder (`stanvid_export.json` + its graphs, `stanvid.export_onnx`): an `OnnxEncoder`
  run by onnxruntime (`stanvid.checkpoints.onnx_runtime`);
- a Hugging Face CLIP directory (`config.json` + `model.safetensors` or `pytorch_model.bin`; normalization from
  `preprocessor_config.json` when present);
- an open_clip directory (`open_clip_config.json` + `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`,
  what `hf-hub:laion/...` repositories hold): architecture, activation and normalization from its config; with a
  timm image tower (SigLIP, SigLIP 2, PE-Core: `stanvid.checkpoints.timm_towers`) its tokenizer too;
- a Hugging Face SigLIP directory (`model_type: siglip`, `stanvid.checkpoints.siglip`): config, weights,
  `preprocessor_config.json` and `spiece.model` or `tokenizer.json`;
- an OpenAI-layout file: OpenAI's TorchScript archive or state dict (fp16 weights are cast to float32), an open_clip
  state dict (`.bin`, `.pt`, `.safetensors`) or training checkpoint (`{'state_dict': {'module.*'}}`), a
  `torch.jit.script` archive of an open_clip model. Such a file does not record its activation or head counts:
  `config=` (an open_clip or Hugging Face config) or the overrides `act` / `vision_heads` / `text_heads` say
  them; without either, OpenAI's CLIP is assumed (QuickGELU, width // 64 heads) and a warning says so, unless
  the file is OpenAI's own archive. An open_clip weights file next to its `open_clip_config.json` uses that config;
- an official STAN checkpoint (`{'state_dict': {'backbone.*', 'text_backbone.*'}}`), with `config=` a CLIP config
  for what the weights cannot tell (head counts, activation);
- a CLIP4Clip checkpoint (`pytorch_model.bin.N`: `clip.*` and, for seqTransf, its temporal head);
- online only: an OpenAI model name (`ViT-B/32`, `ViT-B/16`, `ViT-L/14`), an open_clip name (`ViT-B-32/laion2b_s34b_b79k`,
  see `stanvid.checkpoints.zoo`), `hf-hub:org/name` (open_clip's spelling: its open_clip files) or a Hugging Face hub id
  (a stanvid, Hugging Face CLIP or open_clip repository), downloaded to a cache. Offline, the error says what to
  download and where to put it.
Foreign pickles are read with `torch.load(..., weights_only=True)`; TorchScript through `torch.jit.load` on CPU.
Every argument is applied or refused with a message: `config=` and the architecture overrides are refused for
sources that record their own architecture (stanvid, Hugging Face and open_clip directories).
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from stanvid.checkpoints import convert, siglip, timm_towers, zoo
from stanvid.checkpoints.download import (
    HF_HUB_PREFIX,
    HF_WEIGHTS,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    OPENAI_URLS,
    download_hub,
    download_openai,
)
from stanvid.checkpoints.export_onnx import DEFAULT_OPSET, onnx_encoder_for, write_export
from stanvid.checkpoints.families import FamilyCheckpoint
from stanvid.checkpoints.onnx_runtime import EXPORT_MANIFEST, RUNTIMES, OnnxEncoder, read_export_manifest
from stanvid.checkpoints.weights import assign_state, on_meta, read_safetensors
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import (
    ARCHITECTURE_OVERRIDES,
    CLIPConfig,
    ModelConfig,
    PreprocessConfig,
    clip_preset,
)
from stanvid.models.pretrained import CONFIG_NAME, WEIGHTS_NAME, read_tokenizer_files
from stanvid.models.text_tokenizers import build_tokenizer
from stanvid.models.video_clip import VideoCLIP

log = logging.getLogger("stanvid")


# ---------------------------------------------------------------------------------------------- public API
def create_model(name: str = "ViT-B/32", **overrides: Any) -> VideoCLIP:
    """A randomly initialised model with the architecture of an OpenAI CLIP release (`ViT-B/16`) or of an open_clip
    SigLIP / PE-Core release (`ViT-B-16-SigLIP2`, `PE-Core-B-16`: `stanvid.checkpoints.timm_towers.RELEASES`), for
    tests and benchmarks. A SigLIP model built so has no tokenizer (its file is not shipped with stanvid)."""
    overrides.setdefault("temporal", "stan")
    clip = timm_towers.release_clip_config(name)
    if clip is None:
        try:
            clip = clip_preset(name)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; or an open_clip release: {', '.join(timm_towers.RELEASES)}") from None
    cfg = ModelConfig(clip=clip, name=name).replace(**overrides)
    return VideoCLIP(cfg)


def load_model(
    source: str | os.PathLike, *, config: Any = None, runtime: str | None = None, **overrides: Any
) -> VideoCLIP:
    """Load any supported checkpoint as a `VideoCLIP` in eval mode (see the module docstring for sources).

    `config`: a Hugging Face CLIP `config.json` or an open_clip `open_clip_config.json` (or its directory, or a
    dict) for formats whose weights do not say everything (official STAN, OpenAI-layout state dicts, CLIP4Clip).
    `overrides`: `temporal` (meanP | seqTransf | stan), `stan_depth`, `time_module`, `num_frames`, `pooling`,
    `grad_checkpointing`, `image_mean` / `image_std`; for sources that do not record them, `act` (gelu |
    quick_gelu), `vision_heads`, `text_heads` (see `stanvid.models.config.MODEL_OVERRIDES`); Mug-STAN's head:
    `similarity="mug"`, `mug_mode`, `mug_tau` (an official Mug-STAN checkpoint that stores its config sets them
    itself; see `stanvid.checkpoints.convert.mug_head_overrides`). A plain CLIP becomes `meanP` unless `temporal` says
    otherwise; a temporal module the checkpoint does not have starts from the paper's initialisation (spatial
    modules copied from CLIP, temporal projections zero), and one it has but the override replaces is dropped
    with a log line.

    `runtime`: None runs the source as it is (an ONNX export folder, `stanvid.export_onnx`, in onnxruntime:
    an `OnnxEncoder` with the same encoding API and fingerprint; anything else in PyTorch); `"onnxruntime"`
    runs a PyTorch model through its ONNX export (written once under `$STANVID_CACHE/onnx/`); `"torch"` runs
    an export folder's source model in PyTorch (the model the export records it came from).
    """
    return _load(source, config, overrides, runtime)[0]


class WeightsFile(NamedTuple):
    """The safetensors file whose tensors are exactly a loaded model's state dict, and its settled identity
    when it was read (`stanvid.fileio.settled_identity`)."""

    path: Path
    identity: list[int]


def load_model_and_weights(
    source: str | os.PathLike, runtime: str | None = None, **overrides: Any
) -> tuple[VideoCLIP, WeightsFile | None]:
    """`load_model(source, runtime=runtime, **overrides)`, and the weights file the model's state dict is
    exactly (same names, dtypes and bytes, nothing converted or initialised: a stanvid folder loaded as saved),
    or None. What is computed from the state dict can then be cached under the file's identity (the index's
    fingerprint)."""
    return _load(source, None, overrides, runtime)


def _load(
    source: str | os.PathLike, config: Any, overrides: dict[str, Any], runtime: str | None = None
) -> tuple[VideoCLIP, WeightsFile | None]:
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    path = Path(source).expanduser()
    if runtime == "torch" and (path / EXPORT_MANIFEST).is_file():
        source, overrides = _exported_from(path, overrides)
        path = Path(source).expanduser()
    if runtime == "onnxruntime" and not (path / EXPORT_MANIFEST).is_file():
        return onnx_encoder_for(_load(source, config, overrides, "torch")[0]), None
    name = str(source)
    weights = None
    if path.is_dir():
        model, weights = _load_directory(path, config, overrides)
    elif path.is_file():
        model = _load_file(path, config, overrides)
    elif name in OPENAI_URLS:
        model = _load_file(download_openai(name), config, overrides)
    elif name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX) :]
        if not _looks_like_hub_id(repo):
            raise CheckpointError(f"{name}: expected hf-hub:owner/name")
        model, weights = _load_directory(download_hub(repo, open_clip=True), config, overrides)
    elif _looks_local(name):
        raise CheckpointError(
            f"{source}: no such file or directory (a local path, so not looked up on the hub)"
        )
    elif (entry := zoo.lookup(name)) is not None:
        folder = download_hub(entry.repo, open_clip=True, label=name)
        model, weights = _load_directory(folder, config, overrides, pretrained=entry)
    elif _open_clip_model_name(name):
        model_name = name.replace(":", "/").split("/")[0]
        known = [n for n in zoo.known_names() if n.split("/")[0] == model_name.removesuffix("-quickgelu")]
        raise CheckpointError(
            f"{name}: unknown open_clip pretrained tag for {model_name}; known: {', '.join(known) or 'none'}"
            + (
                " (a -quickgelu name only names QuickGELU releases)"
                if model_name.endswith("-quickgelu")
                else ""
            )
        )
    elif _looks_like_hub_id(name):
        model, weights = _load_directory(download_hub(name), config, overrides)
    else:
        raise CheckpointError(
            f"{source}: no such file or directory, and not a known model name "
            f"({', '.join(OPENAI_URLS)}, an open_clip MODEL/TAG such as ViT-B-32/laion2b_s34b_b79k), "
            f"hf-hub:owner/name or a Hugging Face hub id (owner/name)"
        )
    return model.eval(), weights


def detect_format(source: str | os.PathLike) -> str:
    """Name of the checkpoint format at a local path: stanvid, hf, hf-siglip, open_clip, onnx (an export folder),
    openai-jit, openai, stan, clip4clip."""
    path = Path(source)
    if path.is_dir():
        return _directory_kind(path)
    if _is_torchscript(path):
        return "openai-jit"
    return _state_dict_kind(_read_state(path), path)[0]


# ---------------------------------------------------------------------------------------------- directories
def _directory_kind(path: Path) -> str:
    """stanvid > open_clip (config and weights present) > Hugging Face > open_clip (weights missing: named later).

    A LAION repository holds both a Hugging Face and an open_clip copy of the same model; open_clip's is read
    then, as `hf-hub:` does. A timm repository's `config.json` is timm's, not a CLIP config: its open_clip files
    are read.
    """
    if (path / EXPORT_MANIFEST).is_file():
        return "onnx"
    cfg_path = path / CONFIG_NAME
    cfg = convert.read_json(cfg_path) if cfg_path.is_file() else None
    if isinstance(cfg, dict) and "clip" in cfg and "temporal" in cfg:
        return "stanvid"
    has_open_clip = (path / OPEN_CLIP_CONFIG).is_file()
    if has_open_clip and any((path / name).is_file() for name in OPEN_CLIP_WEIGHTS):
        return "open_clip"
    if siglip.is_siglip_config(cfg):
        return "hf-siglip"
    if isinstance(cfg, dict) and ("vision_config" in cfg or cfg.get("model_type") == "clip"):
        return "hf"
    if has_open_clip:
        return "open_clip"
    if cfg is None:
        raise CheckpointError(
            f"{path}: directory has no {CONFIG_NAME} or {OPEN_CLIP_CONFIG} "
            f"(expected a stanvid, Hugging Face CLIP or open_clip model)"
        )
    raise CheckpointError(
        f"{cfg_path}: neither a stanvid config (clip, temporal) nor a Hugging Face CLIP config, "
        f"and no {OPEN_CLIP_CONFIG} beside it"
    )


def _load_directory(
    path: Path, config: Any, overrides: dict[str, Any], pretrained: zoo.Pretrained | None = None
) -> tuple[VideoCLIP, WeightsFile | None]:
    """The model of a folder, and its weights file when the model's state dict is exactly that file's."""
    kind = _directory_kind(path)
    if kind == "onnx":
        given = sorted(k for k, v in overrides.items() if v is not None) + (["config"] if config else [])
        if given:
            raise ConfigError(
                f"{path}: {', '.join(given)}: an ONNX export is fixed when it is written; export the model "
                f"again with these settings (stanvid export --set ...)"
            )
        return OnnxEncoder.from_folder(path), None
    if config is not None and kind in ("stanvid", "open_clip", "hf-siglip"):
        raise ConfigError(
            f"{path}: config= is only for formats without their own architecture; this {kind} folder has it"
        )
    _refuse_architecture_overrides(overrides, path, kind)
    if kind == "stanvid":
        cfg = ModelConfig.from_json(path / CONFIG_NAME)
        state, identity = read_safetensors(path / WEIGHTS_NAME)
        target = cfg.replace(**overrides)
        model, exact = _build_exact(target, state, source=str(path), checkpoint_temporal=cfg.temporal)
        model.set_tokenizer(build_tokenizer(cfg.clip.tokenizer, read_tokenizer_files(path, cfg), str(path)))
        return model, WeightsFile(path / WEIGHTS_NAME, identity) if exact and identity else None
    if kind == "hf-siglip":
        raw = _read_state(_first_file(path, HF_WEIGHTS, "Hugging Face"))
        return _from_family(siglip.read_siglip_folder(path, raw), str(path), overrides), None
    if kind == "open_clip" and timm_towers.is_timm_tower_config(convert.read_json(path / OPEN_CLIP_CONFIG)):
        raw = _read_state(_first_file(path, OPEN_CLIP_WEIGHTS, "open_clip"))
        found = timm_towers.read_timm_tower_folder(path, OPEN_CLIP_CONFIG, raw)
        if pretrained is not None:  # a named release: its table entry has the last word on preprocessing
            found.clip.preprocess = zoo.preprocess_of(pretrained)
        return _from_family(found, str(path), overrides), None
    if kind == "open_clip":
        clip_cfg = _open_clip_folder_config(path, pretrained)
        weights = _first_file(path, OPEN_CLIP_WEIGHTS, "open_clip")
        return _from_openai_layout(clip_cfg, _read_state(weights), str(path), overrides), None
    # Hugging Face CLIP
    if config is not None:
        clip_cfg = convert.clip_config_from(config)
    else:
        clip_cfg = replace(convert.hf_clip_config(path), preprocess=convert.hf_preprocess_config(path))
    raw = _read_state(_first_file(path, HF_WEIGHTS, "Hugging Face"))
    raw = {k[len("clip_model.") :] if k.startswith("clip_model.") else k: v for k, v in raw.items()}
    state = convert.convert_state_dict(raw, convert.HF_RULES, ignored=convert.HF_BUFFERS, source=str(path))
    return _from_clip_weights(clip_cfg, state, str(path), overrides), None


def _from_family(found: FamilyCheckpoint, source: str, overrides: dict[str, Any]) -> VideoCLIP:
    """Build a SigLIP / PE-Core checkpoint read by its format module, with its tokenizer."""
    model = _from_clip_weights(found.clip, found.state, source, overrides)
    model.set_tokenizer(build_tokenizer(found.clip.tokenizer, found.tokenizer_files, source))
    return model


def _exported_from(path: Path, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The PyTorch source an export folder records, and the overrides it was loaded with (for `runtime="torch"`)."""
    manifest = read_export_manifest(path)
    source = manifest.get("model_source") or ""
    if overrides:
        raise ConfigError(
            f"{path}: {', '.join(sorted(overrides))}: an ONNX export is fixed when it is written"
        )
    if not source or (Path(source).is_absolute() and not Path(source).exists()):
        raise CheckpointError(
            f"{path}: an ONNX export runs in onnxruntime; the PyTorch model it came from "
            f"({source or 'a model in memory'}) is not available here: pass that model for runtime torch"
        )
    return source, dict(manifest.get("model_overrides") or {})


def _refuse_architecture_overrides(overrides: dict[str, Any], path: Path, kind: str) -> None:
    given = [k for k in ARCHITECTURE_OVERRIDES if overrides.get(k) is not None]
    if given:
        raise ConfigError(
            f"{path}: {', '.join(given)}: this {kind} folder records its activation and head counts in its "
            f"config; these overrides are for state-dict files that do not"
        )


def _first_file(path: Path, names: tuple[str, ...], kind: str) -> Path:
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no {' or '.join(names)} in this {kind} directory")


def _open_clip_folder_config(path: Path, pretrained: zoo.Pretrained | None) -> CLIPConfig:
    """`open_clip_config.json` -> `CLIPConfig`; a named release's table entry has the last word on activation
    and normalization (as open_clip's tag configs do), and preprocessing stanvid does differently is logged."""
    cfg_path = path / OPEN_CLIP_CONFIG
    raw = convert.read_json(cfg_path)
    clip_cfg = convert.open_clip_config(raw, str(cfg_path))
    notes = convert.open_clip_preprocess_notes(raw)
    if pretrained is not None:
        act = "quick_gelu" if pretrained.quick_gelu else "gelu"
        if act != clip_cfg.vision.act:
            log.info(
                "%s: %s says %s; the release was trained with %s",
                path,
                OPEN_CLIP_CONFIG,
                clip_cfg.vision.act,
                act,
            )
        clip_cfg = replace(
            clip_cfg,
            vision=replace(clip_cfg.vision, act=act),
            text=replace(clip_cfg.text, act=act),
            preprocess=PreprocessConfig(mean=pretrained.mean, std=pretrained.std),
        )
        if pretrained.resize_mode != "shortest" and not notes:
            notes.append(
                f"resize_mode {pretrained.resize_mode!r} (stanvid resizes the short side and centre-crops)"
            )
    for note in notes:
        log.warning(
            "%s: trained with preprocess %s; embeddings of stanvid's frames may differ slightly", path, note
        )
    return clip_cfg


# ---------------------------------------------------------------------------------------------- files
def _load_file(path: Path, config: Any, overrides: dict[str, Any]) -> VideoCLIP:
    if _is_torchscript(path):
        try:
            with (
                warnings.catch_warnings()
            ):  # torch >= 2.9 marks jit deprecated; OpenAI ships its weights this way
                warnings.simplefilter("ignore", DeprecationWarning)
                raw = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: cannot read the TorchScript archive ({exc})") from exc
        kind, obj = "openai", None
    else:
        obj = _read_state(path)
        kind, raw = _state_dict_kind(obj, path)
    source = str(path)
    if kind == "openai":
        if config is not None:
            clip_cfg = convert.clip_config_from(config)
        elif path.name in OPEN_CLIP_WEIGHTS and (path.parent / OPEN_CLIP_CONFIG).is_file():
            log.info("%s: using %s beside it", path, OPEN_CLIP_CONFIG)
            clip_cfg = _open_clip_folder_config(path.parent, None)
        else:
            clip_cfg = convert.openai_clip_config(raw, source=source)
            if overrides.get("act") is None and not convert.OPENAI_METADATA & set(raw):
                log.warning(
                    "%s: an OpenAI-layout state dict does not record its activation or head counts; assuming "
                    "OpenAI's CLIP (QuickGELU, heads = width // 64). open_clip's LAION / DataComp models use "
                    "exact GELU: pass act='gelu' (CLI: --set act=gelu), vision_heads / text_heads, or config= "
                    "their open_clip_config.json",
                    source,
                )
        return _from_openai_layout(clip_cfg, raw, source, overrides)
    if kind == "clip4clip":
        unsupported = sorted(
            {
                head
                for k in raw
                for prefix, head in convert.CLIP4CLIP_UNSUPPORTED.items()
                if k.startswith(prefix)
            }
        )
        if unsupported:
            raise CheckpointError(
                f"{source}: CLIP4Clip head {', '.join(unsupported)} is not supported "
                f"(stanvid loads CLIP4Clip meanP and seqTransf checkpoints)"
            )
        if config is not None:
            clip_cfg = convert.clip_config_from(config)
        else:  # CLIP4Clip fine-tunes OpenAI's CLIP: QuickGELU, heads = width // 64
            clip_cfg = convert.openai_clip_config(raw, prefix="clip.", source=source)
        state = convert.convert_state_dict(
            raw,
            convert.CLIP4CLIP_RULES,
            transposed=convert.CLIP4CLIP_TRANSPOSED,
            ignored=convert.CLIP4CLIP_METADATA,
            source=source,
        )
        if "temporal" in overrides and overrides["temporal"] != "meanP":
            overrides.setdefault("pooling", "mean" if overrides["temporal"] == "stan" else "normalized_mean")
        else:
            overrides.setdefault("pooling", "normalized_mean")
        return _from_clip_weights(clip_cfg, state, source, overrides)
    # official STAN
    if config is None:
        raise ConfigError(
            f"{source}: an official STAN checkpoint does not record head counts or the activation; pass "
            f"config= (CLI: --config) a Hugging Face CLIP config.json, or its folder, of the CLIP it was trained from"
        )
    clip_cfg = convert.clip_config_from(config)
    # Mug-STAN: the same keys, and the head's configuration from the stored config text when there is one
    meta = obj.get("meta") if isinstance(obj, dict) else None
    for key, value in convert.mug_head_overrides(meta, raw, source).items():
        overrides.setdefault(key, value)
    state = convert.convert_state_dict(raw, convert.STAN_RULES, ignored=convert.STAN_BUFFERS, source=source)
    return _from_clip_weights(clip_cfg, state, source, overrides)


def _from_openai_layout(
    clip_cfg: CLIPConfig, raw: dict[str, torch.Tensor], source: str, overrides: dict[str, Any]
) -> VideoCLIP:
    state = convert.convert_state_dict(
        raw,
        convert.OPENAI_RULES,
        transposed=convert.OPENAI_TRANSPOSED,
        ignored=convert.OPENAI_METADATA | convert.OPENAI_BUFFERS,
        source=source,
    )
    return _from_clip_weights(clip_cfg, state, source, overrides)


def _state_dict_kind(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        if any(k.startswith("backbone.") for k in sd):
            return "stan", sd
        # open_clip's training checkpoints: {'epoch', 'name', 'state_dict', 'optimizer'}, DDP's `module.` prefix
        if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        if "visual.conv1.weight" in sd:
            return "openai", sd
        raise CheckpointError(
            f"{path}: a 'state_dict' with neither backbone.* keys (official STAN) nor OpenAI-layout CLIP keys "
            f"(open_clip training checkpoint)"
        )
    if any(k.startswith("clip.") for k in obj):
        return "clip4clip", obj
    if "visual.conv1.weight" in obj:
        return "openai", obj
    if any(k.startswith("visual.conv1") or k.startswith("visual.layer1") for k in obj):
        raise CheckpointError(f"{path}: ResNet CLIP checkpoints are not supported (ViT only)")
    sample = ", ".join(sorted(obj)[:5])
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (first keys: {sample})")


def _from_clip_weights(
    clip_cfg, state: dict[str, torch.Tensor], source: str, overrides: dict[str, Any]
) -> VideoCLIP:
    convert.check_clip_shapes(clip_cfg, state, source)
    checkpoint_cfg = convert.model_config_for(clip_cfg, state)
    has_temporal = any(k.startswith("temporal.") for k in state)
    target = checkpoint_cfg.replace(**overrides)
    return _build(
        target, state, source=source, checkpoint_temporal=checkpoint_cfg.temporal if has_temporal else None
    )


def _build(
    target: ModelConfig, state: dict[str, torch.Tensor], *, source: str, checkpoint_temporal: str | None
) -> VideoCLIP:
    return _build_exact(target, state, source=source, checkpoint_temporal=checkpoint_temporal)[0]


def _build_exact(
    target: ModelConfig, state: dict[str, torch.Tensor], *, source: str, checkpoint_temporal: str | None
) -> tuple[VideoCLIP, bool]:
    """Instantiate `target` and load `state`; the temporal weights only when they are the same module. Also
    returns whether the model's state dict is `state` exactly (the same names, dtypes and bytes, nothing
    initialised).

    The model is built on the meta device and `state` assigned as its weights (`stanvid.checkpoints.weights`:
    no random init, the weights in memory once); only a state that leaves a tensor to initialise (a temporal
    module the checkpoint lacks, a missing logit scale) is copied into a model built the usual way."""
    same_temporal = checkpoint_temporal == target.temporal and _same_branch(target, state)
    has_temporal_weights = any(k.startswith("temporal.") for k in state)
    if has_temporal_weights and not same_temporal:
        state = {k: v for k, v in state.items() if not k.startswith("temporal.")}
        fresh = (
            "has no weights"
            if target.temporal == "meanP"
            else "starts from the paper's initialisation on this CLIP"
        )
        log.warning(
            "%s: dropping the checkpoint's %s temporal weights as asked; the %s module %s",
            source,
            checkpoint_temporal,
            target.temporal,
            fresh,
        )
    optional = ("logit_scale",) if same_temporal else ("logit_scale", "temporal.")
    with on_meta():
        skeleton = VideoCLIP(target)
    missing = convert.check_converted(skeleton, state, source=source, optional_prefixes=optional)
    if same_temporal and not missing:
        exact = assign_state(skeleton, state)
        if exact is not None:
            return skeleton, exact
    model = VideoCLIP(target)
    convert.load_converted(model, state, source=source, optional_prefixes=optional)
    if not same_temporal:
        model.init_temporal_from_clip()
    return model, False


def _same_branch(target: ModelConfig, state: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's temporal weights are the module `target` describes (depth and kind)."""
    if target.temporal == "stan":
        found = convert.stan_branch_config(state)
        return (
            found is not None
            and found.depth == target.stan.depth
            and found.time_module == target.stan.time_module
        )
    return True


# ---------------------------------------------------------------------------------------------- reading
def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a `constants.pkl`/`code/` entry; plain `torch.save` zips have neither."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_state(path: Path) -> Any:
    """A weights file by its content: safetensors, else a PyTorch pickle (`weights_only=True`)."""
    return _read_safetensors(path) if _is_safetensors(path) else _torch_load(path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor read into memory of its own (`stanvid.checkpoints.weights`): nothing stays mapped."""
    return read_safetensors(path)[0]


def _looks_local(source: str) -> bool:
    """A name meant as a local path (so a typo in it is reported at once, not tried on the hub): it starts with
    `.`, `/` or `~`, has a backslash or more than one `/` (a hub id has exactly one), or its first part is an
    existing folder here (`stanvid-demo/modle` beside a `stanvid-demo` folder)."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    head = source.split("/")[0]
    return "/" in source and bool(head) and Path(head).is_dir()


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _open_clip_model_name(source: str) -> bool:
    """`MODEL/TAG` or `MODEL:TAG` whose MODEL is an open_clip architecture of `stanvid.checkpoints.zoo` (tag unknown)."""
    model = source.replace(":", "/").split("/")[0]
    return ("/" in source or ":" in source) and model.removesuffix("-quickgelu") in zoo.PRETRAINED


def convert_checkpoint(
    source: str | os.PathLike, destination: str | os.PathLike, *, config: Any = None, **overrides: Any
) -> dict[str, Any]:
    """Load `source` (any format above) and write it with `save_pretrained`; returns what was loaded."""
    path = Path(source)
    fmt = detect_format(path) if path.exists() else "download"
    model = load_model(source, config=config, runtime="torch", **overrides)  # an export: the model it records
    model.save_pretrained(destination)
    cfg = model.config
    v = cfg.clip.vision
    temporal = cfg.temporal
    if temporal == "stan":
        temporal += f" ({cfg.stan.time_module}, depth {cfg.stan.depth})"
    elif temporal == "seqTransf":
        temporal += f" ({cfg.seq.layers} layers)"
    return {
        "source": str(source),
        "format": fmt,
        "family": cfg.clip.family,
        "vision": f"ViT {v.width} wide, {v.layers} layers, {v.heads} heads, patch {v.patch_size}, {v.image_size}px, "
        f"{v.act}",
        "text": f"{cfg.clip.text.width} wide, {cfg.clip.text.layers} layers, {cfg.clip.text.heads} heads, "
        f"{cfg.clip.text.act}",
        "mean/std": f"mean {list(cfg.clip.preprocess.mean)}, std {list(cfg.clip.preprocess.std)}, "
        f"{cfg.clip.preprocess.resize_mode} resize, {cfg.clip.preprocess.interpolation}",
        "tokenizer": cfg.clip.tokenizer.kind
        + (f" ({cfg.clip.tokenizer.file})" if cfg.clip.tokenizer.file else ""),
        "temporal": temporal,
        "pooling": cfg.pooling,
        "parameters": f"{model.num_parameters():,}",
        "written": str(destination),
    }


def export_onnx(
    model: str | os.PathLike | VideoCLIP,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    config: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Write `model` (a `VideoCLIP`, or any source `load_model` reads, loaded with `config` and `overrides`) as
    an ONNX export folder at `out`: `video_encoder.onnx`, `image_encoder.onnx`, `text_encoder.onnx`, the
    tokenizer files and `stanvid_export.json` (`stanvid.checkpoints.export_onnx`); returns the manifest.
    `precision`: fp32, fp16 or int8 (onnxruntime's dynamic quantization). `load_model(out)` runs it in
    onnxruntime with the model's encoding API and fingerprint."""
    if isinstance(model, VideoCLIP):
        if overrides or config is not None:
            raise ConfigError("config and overrides apply to a model source, not to a model already built")
        return write_export(model, out, opset=opset, precision=precision)
    if isinstance(model, OnnxEncoder):
        raise CheckpointError(
            f"{model.folder}: already an ONNX export; export the PyTorch model it came from"
        )
    path = Path(model).expanduser()
    source = str(path.resolve()) if path.exists() else str(model)
    loaded = load_model(model, config=config, runtime="torch", **overrides)
    return write_export(loaded, out, opset=opset, precision=precision, source=source, overrides=overrides)
