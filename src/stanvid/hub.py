"""`load_model`, `create_model`, `save_pretrained`: every checkpoint format in, one format out.

Sources `load_model` accepts, told apart by what they contain (not by file name):
- a stanvid directory (`config.json` with a `clip` section + `model.safetensors`), exact round trip;
- a Hugging Face CLIP directory (`config.json` + `model.safetensors` or `pytorch_model.bin`);
- an OpenAI CLIP file, TorchScript archive or plain state dict (fp16 weights are cast to float32);
- an official STAN checkpoint (`{'state_dict': {'backbone.*', 'text_backbone.*'}}`), with `config=` a Hugging Face
  CLIP config for what the weights cannot tell (head counts, activation);
- a CLIP4Clip checkpoint (`pytorch_model.bin.N`: `clip.*` and, for seqTransf, its temporal head);
- online only: an OpenAI model name (`ViT-B/32`, `ViT-B/16`, `ViT-L/14`) or a Hugging Face hub id, downloaded to
  a cache. Offline, the error says what to download and where to put it.
Foreign pickles are read with `torch.load(..., weights_only=True)`; TorchScript through `torch.jit.load` on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stanvid import convert
from stanvid.config import ModelConfig, clip_preset
from stanvid.errors import CheckpointError, ConfigError
from stanvid.model import VideoCLIP

log = logging.getLogger("stanvid")

OPENAI_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def cache_dir() -> Path:
    """Where downloads go: $STANVID_CACHE, else ~/.cache/stanvid."""
    return Path(os.environ.get("STANVID_CACHE", Path.home() / ".cache" / "stanvid"))


# ---------------------------------------------------------------------------------------------- public API
def create_model(name: str = "ViT-B/32", **overrides: Any) -> VideoCLIP:
    """A randomly initialised model with the architecture of an OpenAI CLIP release, for tests and benchmarks."""
    overrides.setdefault("temporal", "stan")
    cfg = ModelConfig(clip=clip_preset(name), name=name).replace(**overrides)
    return VideoCLIP(cfg)


def load_model(source: str | os.PathLike, *, config: Any = None, **overrides: Any) -> VideoCLIP:
    """Load any supported checkpoint as a `VideoCLIP` in eval mode (see the module docstring for sources).

    `config`: a Hugging Face CLIP `config.json` (or its directory, or a dict) for formats whose weights do not
    say everything (official STAN). `overrides`: `temporal` (meanP | seqTransf | stan), `stan_depth`,
    `time_module`, `num_frames`, `pooling`, `grad_checkpointing`, and Mug-STAN's head: `similarity="mug"`,
    `mug_mode`, `mug_tau` (an official Mug-STAN checkpoint that stores its config sets them itself; see
    `stanvid.convert.mug_head_overrides`). A plain CLIP becomes `meanP` unless
    `temporal` says otherwise; a temporal module the checkpoint does not have starts from the paper's
    initialisation (spatial modules copied from CLIP, temporal projections zero), and one it has but the
    override replaces is dropped with a log line.
    """
    path = Path(source)
    if path.is_dir():
        model = _load_directory(path, config, overrides)
    elif path.is_file():
        model = _load_file(path, config, overrides)
    elif str(source) in OPENAI_URLS:
        model = _load_file(_download_openai(str(source)), config, overrides)
    elif _looks_like_hub_id(str(source)):
        model = _load_directory(_download_hub(str(source)), config, overrides)
    else:
        raise CheckpointError(
            f"{source}: no such file or directory, and not a known model name "
            f"({', '.join(OPENAI_URLS)}) or a Hugging Face hub id (owner/name)"
        )
    return model.eval()


def save_pretrained(model: VideoCLIP, directory: str | os.PathLike) -> None:
    """`config.json` + `model.safetensors`, each written to a temporary file and renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(
        directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    )


def detect_format(source: str | os.PathLike) -> str:
    """Name of the checkpoint format at a local path: stanvid, hf, openai-jit, openai, stan, clip4clip."""
    path = Path(source)
    if path.is_dir():
        return _directory_kind(path)
    if _is_torchscript(path):
        return "openai-jit"
    return _state_dict_kind(_torch_load(path), path)[0]


# ---------------------------------------------------------------------------------------------- directories
def _directory_kind(path: Path) -> str:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{path}: directory has no {CONFIG_NAME} (expected a stanvid or Hugging Face CLIP model)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if isinstance(cfg, dict) and "clip" in cfg and "temporal" in cfg:
        return "stanvid"
    if isinstance(cfg, dict) and ("vision_config" in cfg or cfg.get("model_type") == "clip"):
        return "hf"
    raise CheckpointError(
        f"{cfg_path}: neither a stanvid config (clip, temporal) nor a Hugging Face CLIP config"
    )


def _load_directory(path: Path, config: Any, overrides: dict[str, Any]) -> VideoCLIP:
    kind = _directory_kind(path)
    if kind == "stanvid":
        cfg = ModelConfig.from_json(path / CONFIG_NAME)
        if config is not None:
            raise ConfigError(
                f"{path}: config= is only for formats without their own architecture; this one has it"
            )
        state = _read_safetensors(path / WEIGHTS_NAME)
        target = cfg.replace(**overrides)
        return _build(target, state, source=str(path), checkpoint_temporal=cfg.temporal)
    # Hugging Face CLIP
    clip_cfg = convert.hf_clip_config(config if config is not None else path)
    if (path / WEIGHTS_NAME).is_file():
        raw = _read_safetensors(path / WEIGHTS_NAME)
    elif (path / "pytorch_model.bin").is_file():
        raw = _torch_load(path / "pytorch_model.bin")
    else:
        raise CheckpointError(
            f"{path}: no {WEIGHTS_NAME} or pytorch_model.bin in this Hugging Face directory"
        )
    raw = {k[len("clip_model.") :] if k.startswith("clip_model.") else k: v for k, v in raw.items()}
    state = convert.convert_state_dict(raw, convert.HF_RULES, ignored=convert.HF_BUFFERS, source=str(path))
    return _from_clip_weights(clip_cfg, state, str(path), overrides)


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
        obj = _torch_load(path)
        kind, raw = _state_dict_kind(obj, path)
    source = str(path)
    if kind == "openai":
        clip_cfg = convert.openai_clip_config(raw, source=source)
        state = convert.convert_state_dict(
            raw,
            convert.OPENAI_RULES,
            transposed=convert.OPENAI_TRANSPOSED,
            ignored=convert.OPENAI_METADATA,
            source=source,
        )
        return _from_clip_weights(clip_cfg, state, source, overrides)
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
    clip_cfg = convert.hf_clip_config(config)
    # Mug-STAN: the same keys, and the head's configuration from the stored config text when there is one
    for key, value in convert.mug_head_overrides(obj.get("meta"), raw, source).items():
        overrides.setdefault(key, value)
    state = convert.convert_state_dict(raw, convert.STAN_RULES, ignored=convert.STAN_BUFFERS, source=source)
    return _from_clip_weights(clip_cfg, state, source, overrides)


def _state_dict_kind(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        if any(k.startswith("backbone.") for k in sd):
            return "stan", sd
        raise CheckpointError(
            f"{path}: a 'state_dict' without backbone.* keys is not an official STAN checkpoint"
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
):
    """Instantiate `target` and load `state`; the temporal weights only when they are the same module."""
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
    model = VideoCLIP(target)
    optional = ("logit_scale",) if same_temporal else ("logit_scale", "temporal.")
    convert.load_converted(model, state, source=source, optional_prefixes=optional)
    if not same_temporal:
        model.init_temporal_from_clip()
    return model


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


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from exc


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- downloads
def _download_openai(name: str) -> Path:
    url = OPENAI_URLS[name]
    expected_sha = url.rsplit("/", 2)[-2]
    target = cache_dir() / "openai" / url.rsplit("/", 1)[-1]
    if target.is_file() and _sha256(target) == expected_sha:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _atomic_write(target, lambda p: _fetch(url, p))
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(
            f"cannot download {name} from {url} ({exc}). Download it on a machine with internet access and "
            f"either put it at {target} or pass its path: stanvid.load_model('/path/to/{target.name}')"
        ) from exc
    if _sha256(target) != expected_sha:
        target.unlink(missing_ok=True)
        raise CheckpointError(f"{name}: downloaded file does not match its SHA256 {expected_sha}; try again")
    return target


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=30) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"{repo_id}: loading from the Hugging Face hub needs `pip install huggingface_hub` (or download the "
            f"repository's config.json and model.safetensors into a folder and pass that folder)"
        ) from exc
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"])
        )
    except Exception as exc:  # offline, unknown repo, auth: the hub client has many error types
        raise CheckpointError(
            f"{repo_id}: cannot download from the Hugging Face hub ({type(exc).__name__}: {exc}). Download "
            f"config.json and model.safetensors of https://huggingface.co/{repo_id} into a folder and pass that folder"
        ) from exc


def convert_checkpoint(
    source: str | os.PathLike, destination: str | os.PathLike, *, config: Any = None, **overrides: Any
) -> dict[str, Any]:
    """Load `source` (any format above) and write it with `save_pretrained`; returns what was loaded."""
    path = Path(source)
    fmt = detect_format(path) if path.exists() else "download"
    model = load_model(source, config=config, **overrides)
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
        "vision": f"ViT {v.width} wide, {v.layers} layers, {v.heads} heads, patch {v.patch_size}, {v.image_size}px",
        "text": f"{cfg.clip.text.width} wide, {cfg.clip.text.layers} layers, {cfg.clip.text.heads} heads",
        "temporal": temporal,
        "pooling": cfg.pooling,
        "parameters": f"{model.num_parameters():,}",
        "written": str(destination),
    }
