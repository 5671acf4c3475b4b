"""`push_to_hub`: a stanvid model, its model card and its run's evaluation, to a Hugging Face hub repository.

The repository then holds exactly what `save_pretrained` writes (`config.json` + `model.safetensors`, and a
recognition head when the run had one), so `stanvid.load_model("user/repo")` reads it back through the same
code as a local folder. The card (`README.md`) says what the model is (its config, in words and as JSON), how
well it did (the run's `eval.json`, when there is one, as the table `stanvid eval` prints) and how to load it.

It sits in the training layer because the evaluation is a training run's: the upload and the card's model
description are `stanvid.checkpoints.upload`. Needs `huggingface_hub` (`pip install 'stanvid[hub]'`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from stanvid.checkpoints.load import detect_format, load_model
from stanvid.checkpoints.upload import check_repo_id, model_card, upload_folder
from stanvid.errors import CheckpointError, ConfigError
from stanvid.models.pretrained import save_pretrained
from stanvid.models.video_clip import VideoCLIP
from stanvid.training.metrics import format_table

EVAL_NAME = "eval.json"


def push_to_hub(
    source: Any,
    repo_id: str,
    *,
    run_dir: str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload stanvid model",
) -> str:
    """Upload a stanvid model to `repo_id` (created if needed); returns the repository URL.

    `source`: a `VideoCLIP` (saved to a temporary folder first) or a stanvid folder (`save_pretrained`'s output,
    e.g. `runs/msrvtt/model`). `run_dir`: where the run's `eval.json` is; by default the folder itself and its
    parent (a training run writes `runs/NAME/eval.json` beside `runs/NAME/model/`). The folder is loaded once
    before anything is uploaded, so a broken folder is refused rather than published.
    """
    check_repo_id(repo_id)
    if isinstance(source, VideoCLIP):
        with tempfile.TemporaryDirectory(prefix="stanvid-push-") as tmp:
            save_pretrained(source, tmp)
            return _push(Path(tmp), source, repo_id, run_dir, None, private, token, commit_message)
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if detect_format(folder) != "stanvid":
        raise CheckpointError(f"{folder}: not a stanvid model folder; convert it first (stanvid convert)")
    model = load_model(folder)  # a folder whose weights do not load is refused before anything is uploaded
    return _push(folder, model, repo_id, run_dir, folder, private, token, commit_message)


def _push(
    folder: Path,
    model: VideoCLIP,
    repo_id: str,
    run_dir: Any,
    origin: Path | None,
    private: bool,
    token: str | None,
    commit_message: str,
) -> str:
    eval_path = find_eval(run_dir, origin)
    report = read_eval(eval_path) if eval_path is not None else None
    card = model_card(
        model.config,
        repo_id,
        evaluation=evaluation_section(report) if report is not None else None,
        parameters=model.num_parameters(),
    )
    extra = {EVAL_NAME: eval_path} if eval_path is not None else None
    return upload_folder(
        folder, repo_id, card, extra_files=extra, private=private, token=token, commit_message=commit_message
    )


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


def evaluation_section(report: dict[str, Any]) -> list[str]:
    """The card's evaluation: the recipe's facts, then the metrics as `stanvid eval` prints them."""
    facts = [
        ("recipe", report.get("recipe")),
        ("task", report.get("task")),
        ("test annotations", report.get("test_annotations")),
        ("videos", report.get("num_videos")),
        ("texts", report.get("num_texts")),
    ]
    lines = [f"- {k}: {val}" for k, val in facts if val is not None]
    lines += ["", "```", format_table(report["metrics"]), "```", ""]
    lines += ["(from `eval.json` in this repository, written by `stanvid eval` or the training run)", ""]
    return lines
