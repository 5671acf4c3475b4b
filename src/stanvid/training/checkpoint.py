"""Training checkpoints on disk: where they are, how one is written, and the one reader of them.

A checkpoint is ``out_dir/checkpoints/step-XXXXXXXX.pt``, a ``torch.save`` of a dict marked with
``format: CHECKPOINT_FORMAT`` (what `stanvid.training.loop.fit` puts in it is described there). It is written
atomically (`stanvid.fileio.atomic_save`), and read back with ``torch.load(weights_only=True)`` only, so a
hostile file can run no code: `read_checkpoint_file` is the single place that unpickles one, and every
failure becomes a one-line `CheckpointError` naming the file.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from stanvid.errors import CheckpointError
from stanvid.fileio import atomic_save

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_dir",
    "latest_checkpoint",
    "newest_readable_checkpoint",
    "read_checkpoint_file",
    "load_checkpoint",
    "write_checkpoint",
    "is_training_checkpoint",
    "is_torch_save_zip",
    "code_version",
    "first_line",
]

CHECKPOINT_FORMAT = "stanvid-train-checkpoint"


def first_line(exc: BaseException) -> str:
    """`Type: first line` of an exception (torch's unpickling errors run to a page of advice)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


# ---- where they are ------------------------------------------------------------------------------------------


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoints/step-*.pt`` under a run folder (by step), or None."""
    found = _checkpoints_newest_first(Path(out_dir))
    return found[0] if found else None


def _checkpoints_newest_first(out_dir: Path) -> list[Path]:
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("step-*.pt"):
        try:
            found.append((int(path.stem.split("-", 1)[1]), path))
        except ValueError:
            continue
    return [path for _, path in sorted(found, reverse=True)]


def newest_readable_checkpoint(out_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that loads, and its state. A newer one that does not (truncated by a full disk, a
    copy cut short) is skipped with a line saying which and why; it is left in place, and the resumed run
    writes that step again. When none loads: (the newest, None), so the caller's load raises its error."""
    found = _checkpoints_newest_first(out_dir)
    for path in found:
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            print(f"resume: skipping {path}: {exc}; trying the previous checkpoint", file=sys.stderr)
            continue
        if path != found[0]:
            print(f"resume: continuing from {path.name}, the newest checkpoint that reads", file=sys.stderr)
        return path, state
    return (found[0] if found else None), None


# ---- reading -------------------------------------------------------------------------------------------------


def read_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Whatever a ``torch.save`` file holds, read with ``weights_only=True`` (a pickle that would call code is
    refused, nothing runs); a missing, truncated, foreign or hostile file raises a one-line `CheckpointError`."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: checkpoint not found") from exc
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise CheckpointError(
            f"{path}: not a readable stanvid training checkpoint ({first_line(exc)})"
        ) from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint written by `fit`, read with ``weights_only=True``; checks its format marker."""
    state = read_checkpoint_file(path, map_location)
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path}: not a stanvid training checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    return state


def is_training_checkpoint(state: Any) -> bool:
    """Whether a loaded object carries the training checkpoint's format marker."""
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def is_torch_save_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip written by ``torch.save`` (not TorchScript, which `read_checkpoint_file` cannot
    read), so a caller given any model source knows to try it as a checkpoint first."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/data.pkl") for n in names) and not any(
        n.endswith("/constants.pkl") for n in names
    )


# ---- writing -------------------------------------------------------------------------------------------------


def write_checkpoint(state: dict[str, Any], out_dir: Path, step: int, keep: int) -> Path:
    """Write ``state`` as ``out_dir/checkpoints/step-<step>.pt`` (atomically) and delete all but the newest
    ``keep`` (> 0) step checkpoints, newest by step as `latest_checkpoint` orders them; returns the path
    written."""
    path = checkpoint_dir(out_dir) / f"step-{step:08d}.pt"
    atomic_save(state, path)
    for stale in _checkpoints_newest_first(out_dir)[keep:]:
        stale.unlink()
    return path


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """The stanvid version and ``git describe`` of the source tree (None outside a git checkout)."""
    try:  # the installed distribution's version (the package namespace sits above this layer)
        version = importlib.metadata.version("stanvid")
    except importlib.metadata.PackageNotFoundError:
        version = None
    described = None
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            described = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        described = None
    return {"stanvid": version, "git": described}
