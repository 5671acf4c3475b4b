"""`push_to_hub`: a stanvid model folder, plus a model card, to a Hugging Face hub repository.

The repository then holds exactly what `save_pretrained` writes (`config.json` + `model.safetensors`, and a
recognition head when the run had one), so `stanvid.load_model("user/repo")` reads it back through the same
code as a local folder. The card (`README.md`) says what the model is (its config, in words and as JSON), how
well it did (the run's `eval.json`, when there is one) and how to load it. Needs `huggingface_hub`
(`pip install 'stanvid[hub]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stanvid.errors import CheckpointError
from stanvid.hub_upload import (  # noqa: F401 -- the card and upload, importable from here as before
    CARD_NAME,
    EVAL_NAME,
    MODEL_FILES,
    check_repo_id,
    find_eval,
    model_card,
    push_folder,
    push_model,
    read_eval,
)


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
    from stanvid.hub import detect_format, load_model
    from stanvid.model import VideoCLIP

    check_repo_id(repo_id)
    if isinstance(source, VideoCLIP):
        return push_model(
            source, repo_id, run_dir=run_dir, private=private, token=token, commit_message=commit_message
        )
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if detect_format(folder) != "stanvid":
        raise CheckpointError(f"{folder}: not a stanvid model folder; convert it first (stanvid convert)")
    model = load_model(folder)  # a folder whose weights do not load is refused before anything is uploaded
    return push_folder(folder, model, repo_id, run_dir, private, token, commit_message, folder)
