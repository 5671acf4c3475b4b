"""Uploading a saved stanvid model folder and its model card to a Hugging Face hub repository.

The transport and the card's description of the model live here, below training: `stanvid.training.publish`
adds what only a training run knows (its `eval.json`, rendered as the metrics table `stanvid eval` prints)
and calls `upload_folder`. Needs `huggingface_hub` (`pip install 'stanvid[hub]'`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.config import ModelConfig

MODEL_FILES = ("config.json", "model.safetensors", "head.safetensors")  # what a stanvid folder can hold
# plus the tokenizer file its config names (SigLIP's spiece.model, a tokenizer.json): `model_files`
CARD_NAME = "README.md"


def check_repo_id(repo_id: Any) -> None:
    """A hub repository id is owner/name; anything else is a `ConfigError` naming it."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"{repo_id!r}: expected a hub repository id, owner/name")


def upload_folder(
    folder: Path,
    repo_id: str,
    card: str,
    *,
    extra_files: Mapping[str, Path] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload stanvid model",
) -> str:
    """One commit to `repo_id` (created if needed): the model files of `folder`, `extra_files` (name in the
    repository -> local file) and `card` as README.md; returns the repository URL."""
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError as exc:
        raise CheckpointError(
            "pushing to the Hugging Face hub needs huggingface_hub: pip install 'stanvid[hub]'"
        ) from exc
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in model_files(folder)
        if (folder / name).is_file()
    ]
    for name, path in (extra_files or {}).items():
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    return str(url)


def model_files(folder: Path) -> list[str]:
    """The files of a stanvid folder that make the model: `MODEL_FILES` and its tokenizer's file."""
    names = list(MODEL_FILES)
    if (folder / "config.json").is_file():
        tokenizer = ModelConfig.from_json(folder / "config.json").clip.tokenizer
        if tokenizer.kind != "clip":
            names.append(tokenizer.file)
    return names


def model_card(
    config: ModelConfig, repo_id: str, *, evaluation: list[str] | None = None, parameters: int | None = None
) -> str:
    """The repository's README.md: what the model is, its evaluation (markdown lines, when given), how to load
    it."""
    v, t, pre = config.clip.vision, config.clip.text, config.clip.preprocess
    temporal = {
        "stan": f"STAN branch ({config.stan.time_module}, depth {config.stan.depth})",
        "seqTransf": f"CLIP4Clip seqTransf ({config.seq.layers} layers)",
        "meanP": "mean of frame embeddings (meanP)",
    }[config.temporal]
    rows = [
        ("temporal module", temporal),
        ("frames per clip", str(config.num_frames)),
        ("frame pooling", config.pooling),
        (
            "vision tower",
            f"ViT, width {v.width}, {v.layers} layers, {v.heads} heads, patch {v.patch_size}, "
            f"{v.image_size} px, {v.act}",
        ),
        (
            "text tower",
            f"width {t.width}, {t.layers} layers, {t.heads} heads, {t.context_length} tokens, {t.act}",
        ),
        ("embedding size", str(config.clip.embed_dim)),
        ("frame normalization", f"mean {list(pre.mean)}, std {list(pre.std)}"),
    ]
    if parameters is not None:
        rows.append(("parameters", f"{parameters:,}"))
    lines = [
        "---",
        "library_name: stanvid",
        "tags:",
        "- stanvid",
        "- video-text-retrieval",
        "- clip",
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        "A video-text model saved by stanvid: CLIP turned into a video model with a temporal module (STAN, "
        "*Revisiting Temporal Modeling for CLIP-based Image-to-Video Knowledge Transferring*, CVPR 2023, or a "
        "baseline).",
        "",
        "## Use",
        "",
        "```bash",
        "pip install 'stanvid[hub]'",
        f"stanvid index ~/Videos --model {repo_id} --out videos.idx",
        'stanvid search videos.idx "a dog catches a frisbee"',
        "```",
        "",
        "```python",
        "import stanvid",
        "",
        f'model = stanvid.load_model("{repo_id}")',
        "pre = model.config.clip.preprocess  # the normalization and resize the model was trained with",
        f"transform = stanvid.EvalTransform({v.image_size}, mean=pre.mean, std=pre.std, "
        "resize_mode=pre.resize_mode, interpolation=pre.interpolation)",
        f'idx = stanvid.uniform_indices(stanvid.probe("clip.mp4").num_frames, {config.num_frames})',
        f'video = transform(stanvid.read_frames("clip.mp4", idx))[None]  # (1, {config.num_frames}, 3, '
        f"{v.image_size}, {v.image_size})",
        'ids = model.tokenize(["a dog catches a frisbee"])  # the model\'s own tokenizer',
        "sim = model.similarity(model.encode_text(ids), model.encode_video(video))  # (1, 1)",
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {val} |" for k, val in rows],
        "",
    ]
    if evaluation is not None:
        lines += ["## Evaluation", "", *evaluation]
    lines += [
        "## Config",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
