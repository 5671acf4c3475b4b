"""Uploading a saved stanvid model folder and its model card to a Hugging Face hub repository.

This half of `stanvid.publish` needs neither the model class nor the loaders, so `VideoCLIP.push_to_hub`
can call it without an import cycle: a model in memory is written with `stanvid.pretrained.save_pretrained`
and uploaded as a folder. Needs `huggingface_hub` (`pip install 'stanvid[hub]'`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from stanvid.config import ModelConfig
from stanvid.errors import CheckpointError, ConfigError
from stanvid.metrics import format_table
from stanvid.pretrained import save_pretrained

MODEL_FILES = ("config.json", "model.safetensors", "head.safetensors")  # what a stanvid folder can hold
EVAL_NAME = "eval.json"
CARD_NAME = "README.md"


def check_repo_id(repo_id: Any) -> None:
    """A hub repository id is owner/name; anything else is a `ConfigError` naming it."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"{repo_id!r}: expected a hub repository id, owner/name")


def push_model(
    model: Any,
    repo_id: str,
    *,
    run_dir: str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload stanvid model",
) -> str:
    """Upload a `VideoCLIP` in memory (saved to a temporary folder first); see `stanvid.publish.push_to_hub`."""
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="stanvid-push-") as tmp:
        save_pretrained(model, tmp)
        return push_folder(Path(tmp), model, repo_id, run_dir, private, token, commit_message, None)


def push_folder(
    folder: Path,
    model,
    repo_id: str,
    run_dir: Any,
    private: bool,
    token: str | None,
    commit_message: str,
    origin: Path | None,
) -> str:
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError as exc:
        raise CheckpointError(
            "pushing to the Hugging Face hub needs huggingface_hub: pip install 'stanvid[hub]'"
        ) from exc
    eval_path = find_eval(run_dir, origin)
    report = read_eval(eval_path) if eval_path is not None else None
    card = model_card(model.config, repo_id, report=report, parameters=model.num_parameters())
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in MODEL_FILES
        if (folder / name).is_file()
    ]
    if eval_path is not None:
        operations.append(CommitOperationAdd(path_in_repo=EVAL_NAME, path_or_fileobj=str(eval_path)))
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    return str(url)


def find_eval(run_dir: Any, folder: Path | None) -> Path | None:
    """`eval.json` of `run_dir` (which must have one), else of the model folder or its parent, else None."""
    if run_dir is not None:
        path = Path(run_dir)
        path = path if path.name == EVAL_NAME else path / EVAL_NAME
        if not path.is_file():
            raise ConfigError(f"{path}: no evaluation report here (stanvid eval writes one)")
        return path
    if folder is None:
        return None
    for candidate in (folder / EVAL_NAME, folder.parent / EVAL_NAME):
        if candidate.is_file():
            return candidate
    return None


def read_eval(path: Path) -> dict[str, Any]:
    """The report `stanvid eval` / a training run writes; refuses one without metrics (naming the file)."""
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict) or not report["metrics"]:
        raise ConfigError(f"{path}: no 'metrics' in this evaluation report")
    try:
        format_table(report["metrics"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: metrics are not a table of numbers ({exc})") from exc
    return report


def model_card(
    config: ModelConfig, repo_id: str, *, report: dict[str, Any] | None = None, parameters: int | None = None
) -> str:
    """The repository's README.md: what the model is, its evaluation, how to load it."""
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
        "pre = model.config.clip.preprocess  # the normalization the model was trained with",
        f"transform = stanvid.EvalTransform({v.image_size}, mean=pre.mean, std=pre.std)",
        f'idx = stanvid.uniform_indices(stanvid.probe("clip.mp4").num_frames, {config.num_frames})',
        f'video = transform(stanvid.read_frames("clip.mp4", idx))[None]  # (1, {config.num_frames}, 3, '
        f"{v.image_size}, {v.image_size})",
        f'ids = stanvid.tokenize(["a dog catches a frisbee"], context_length={min(32, t.context_length)})',
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
    if report is not None:
        lines += ["## Evaluation", ""]
        facts = [
            ("recipe", report.get("recipe")),
            ("task", report.get("task")),
            ("test annotations", report.get("test_annotations")),
            ("videos", report.get("num_videos")),
            ("texts", report.get("num_texts")),
        ]
        lines += [f"- {k}: {val}" for k, val in facts if val is not None]
        lines += ["", "```", format_table(report["metrics"]), "```", ""]
        lines += ["(from `eval.json` in this repository, written by `stanvid eval` or the training run)", ""]
    lines += [
        "## Config",
        "",
        "```json",
        json.dumps(config.to_dict(), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
