"""Downloads into a cache: OpenAI's released CLIP files (checked by SHA-256) and Hugging Face hub repositories.

`stanvid.checkpoints.load` asks for a file or a folder here and reads it like a local one; offline, every error
says what to download and where to put it. The file names of each format are defined here, where the hub files
are chosen by them.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from stanvid.checkpoints.convert import read_json
from stanvid.errors import CheckpointError
from stanvid.fileio import atomic_write_stream, sha256_file
from stanvid.models.pretrained import CONFIG_NAME, WEIGHTS_NAME

OPENAI_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}
HF_WEIGHTS = (WEIGHTS_NAME, "pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # preferred first
HF_PREPROCESSOR = "preprocessor_config.json"
HF_HUB_PREFIX = "hf-hub:"
# tokenizer files beside the weights (SigLIP's SentencePiece model or a tokenizer.json, and its settings)
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where downloads go: $STANVID_CACHE, else ~/.cache/stanvid."""
    return Path(os.environ.get("STANVID_CACHE", Path.home() / ".cache" / "stanvid"))


def download_openai(name: str) -> Path:
    url = OPENAI_URLS[name]
    expected_sha = url.rsplit("/", 2)[-2]
    target = cache_dir() / "openai" / url.rsplit("/", 1)[-1]
    if target.is_file() and sha256_file(target) == expected_sha:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # streamed to disk (hundreds of MB), renamed into place only when complete
        atomic_write_stream(target, lambda f: _fetch(url, f))
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(
            f"cannot download {name} from {url} ({exc}). Download it on a machine with internet access and "
            f"either put it at {target} or pass its path: stanvid.load_model('/path/to/{target.name}')"
        ) from exc
    if sha256_file(target) != expected_sha:
        target.unlink(missing_ok=True)
        raise CheckpointError(f"{name}: downloaded file does not match its SHA256 {expected_sha}; try again")
    return target


def _fetch(url: str, out: BinaryIO) -> None:
    with urllib.request.urlopen(url, timeout=30) as response:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def download_hub(repo_id: str, *, open_clip: bool = False, label: str | None = None) -> Path:
    """Download what `load_model` reads of a hub repository into huggingface_hub's cache; returns the folder.

    The configs come first (small), then only the weights of the format they describe: a LAION repository
    holds a Hugging Face and an open_clip copy of the same weights, and one is enough. `open_clip`: the open_clip
    files only (`hf-hub:` names, `stanvid.checkpoints.zoo` releases).
    """
    label = label or repo_id
    url = f"https://huggingface.co/{repo_id}"
    what = (
        f"{OPEN_CLIP_CONFIG} and {' or '.join(OPEN_CLIP_WEIGHTS)}"
        if open_clip
        else f"{CONFIG_NAME} and {WEIGHTS_NAME} (a stanvid or Hugging Face CLIP repository), or {OPEN_CLIP_CONFIG} "
        f"and {' or '.join(OPEN_CLIP_WEIGHTS)} (an open_clip one)"
    )
    advice = (
        f"Download {what} of {url} into a folder and pass that folder: stanvid.load_model('/path/to/folder')"
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise CheckpointError(
            f"{label}: loading from the Hugging Face hub needs `pip install huggingface_hub` "
            f"(pip install 'stanvid[hub]'). {advice}"
        ) from exc
    configs = (OPEN_CLIP_CONFIG,) if open_clip else (CONFIG_NAME, OPEN_CLIP_CONFIG, HF_PREPROCESSOR)
    found, failures = _hub_files(hf_hub_download, repo_id, configs + TOKENIZER_FILES)
    if not found:
        reason = "; ".join(failures) or f"none of {', '.join(configs)} in the repository"
        raise CheckpointError(f"{label}: cannot download from the Hugging Face hub ({reason}). {advice}")
    folder = found[0].parent
    if open_clip:
        kind = "open_clip"
    else:
        cfg = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
        is_stanvid = isinstance(cfg, dict) and "clip" in cfg and "temporal" in cfg
        kind = "stanvid" if is_stanvid else "open_clip" if (folder / OPEN_CLIP_CONFIG).is_file() else "hf"
    candidates = {"stanvid": (WEIGHTS_NAME,), "hf": HF_WEIGHTS, "open_clip": OPEN_CLIP_WEIGHTS}[kind]
    for name in candidates:  # the first that the repository has
        weights, failed = _hub_files(hf_hub_download, repo_id, (name,))
        failures += failed
        if weights:
            break
    else:
        reason = "; ".join(failures) or f"none of {', '.join(candidates)} in the repository"
        raise CheckpointError(
            f"{label}: cannot download the weights from the Hugging Face hub ({reason}). {advice}"
        )
    return weights[0].parent


def _hub_files(download, repo_id: str, names: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """Download each of `names` that the repository has: (paths, failures other than "not in the repository")."""
    from huggingface_hub import errors

    found, failures = [], []
    for name in names:
        try:
            found.append(Path(download(repo_id, name)))
        except errors.LocalEntryNotFoundError as exc:  # offline, not cached (an EntryNotFoundError too)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        except errors.EntryNotFoundError:  # the repository has no such file
            continue
        except Exception as exc:  # connection, unknown repository, authentication: the client has many types
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    return found, failures
