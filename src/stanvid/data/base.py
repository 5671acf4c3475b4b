"""What every stanvid dataset shares: finding video files, reading a sampled clip, and broken-video policy.

A broken video is never replaced by another sample (mmengine's datasets retry a random index, which
silently changes the data). With ``on_error="raise"`` (the default) the ``VideoReadError`` propagates; with
``on_error="skip"`` the dataset returns a :class:`SkippedSample` record naming the file and the reason,
:func:`collate_skipping` drops such records from the batch and lists them under ``batch["skipped"]`` (so
the record survives the trip back from a worker process), and ``stanvid.data.make_loader`` gathers them
into ``loader.skipped`` for a summary at the end of the run.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from stanvid.errors import ConfigError, DatasetError, VideoReadError
from stanvid.video.decode import VIDEO_EXTENSIONS
from stanvid.video.frames import is_frame_folder, is_image

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoFinder",
    "SkippedSample",
    "VideoClipDataset",
    "collate_skipping",
    "format_skipped",
    "check_caption",
    "existing_file",
    "read_json",
    "read_csv_rows",
    "read_lines",
    "require_field",
]


def check_caption(text: Any, where: str) -> str:
    """The caption stripped, or ``DatasetError`` naming ``where`` if it is not text or has no tokens."""
    if not isinstance(text, str):
        raise DatasetError(f"{where}: caption must be a string, got {type(text).__name__} {text!r}")
    text = text.strip()
    if "&" in text or not any(ch.isalnum() for ch in text):
        # Only text without letters or digits, or with HTML entities ("&nbsp;"), can tokenize to nothing;
        # ask the tokenizer about those (the rest skip its cost: MSR-VTT has 200k captions).
        from stanvid.models.tokenizer import is_empty_caption

        if not text or is_empty_caption(text):
            raise DatasetError(f"{where}: empty caption {text!r}")
    return text


# --- annotation files: every error names the file and the line or entry ---------------------------------


def existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = existing_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None


def read_csv_rows(
    path: str | os.PathLike, required: Sequence[str], delimiter: str = ","
) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV with a header, as ``("file:line", row)``; checks the ``required`` columns are there."""
    path = existing_file(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DatasetError(f"{path}: empty file (expected a header with {', '.join(required)})")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        absent = [name for name in required if name not in reader.fieldnames]
        if absent:
            raise DatasetError(f"{path}:1: missing column(s) {absent}; the header has {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            for name in required:
                if row.get(name) is None:
                    raise DatasetError(f"{where}: missing field {name!r}")
            yield where, row


def read_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Non-blank, non-comment (``#``) lines of a text file as ``("file:line", stripped line)``."""
    path = existing_file(path)
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield f"{path}:{number}", line


def require_field(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DatasetError(f"{where}: missing field {key!r}")
    return entry[key]


class VideoFinder:
    """Resolves a video id from an annotation file to a file under ``root``.

    Tried in order: ``root/<id>`` as written; ``root/<id><ext>`` for each known extension (and, when the id
    already ends in a video extension, ``root/<stem><ext>``, for videos re-encoded to another container);
    then any file under ``root`` (recursively: Kinetics and LSMDC keep videos in per-class or per-movie
    folders) whose name is ``<id>`` or whose stem is ``<id>``/``<stem>``. The recursive listing is built
    once, on the first id not found directly.

    A folder of images is a video too (`stanvid.video.frames`: mmaction2's rawframes, one folder per video):
    ``root/<id>`` as a folder of frames, or any frame folder under ``root`` named ``<id>``; a video file that
    matches is preferred (frames extracted beside their videos do not replace them).
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"video folder {self.root} does not exist or is not a folder")
        self.extensions = tuple(extensions)
        self._by_name: dict[str, list[Path]] | None = None
        self._by_stem: dict[str, list[Path]] | None = None
        self._frame_dirs: dict[str, list[Path]] = {}

    def _stem(self, name: str) -> str | None:
        suffix = Path(name).suffix.lower()
        return name[: -len(suffix)] if suffix in self.extensions else None

    def _build_listing(self) -> None:
        by_name: dict[str, list[Path]] = {}
        by_stem: dict[str, list[Path]] = {}
        for folder, _, files in os.walk(self.root):
            if any(map(is_image, files)):
                self._frame_dirs.setdefault(Path(folder).name, []).append(Path(folder))
            for file in files:
                path = Path(folder) / file
                by_name.setdefault(file, []).append(path)
                stem = self._stem(file)
                if stem is not None:
                    by_stem.setdefault(stem, []).append(path)
        self._by_name, self._by_stem = by_name, by_stem

    def find(self, video_id: str) -> Path | None:
        """The file for ``video_id``, or None. Raises ``DatasetError`` when several files match."""
        direct = self.root / video_id
        if direct.is_file():
            return direct
        stem = self._stem(video_id)
        for base in (video_id, stem):
            if base is None:
                continue
            for ext in self.extensions:
                path = self.root / f"{base}{ext}"
                if path.is_file():
                    return path
        if is_frame_folder(direct):
            return direct
        if self._by_name is None:
            self._build_listing()
        assert self._by_name is not None and self._by_stem is not None
        name = Path(video_id).name
        matches = (
            self._by_name.get(name)
            or self._by_stem.get(name)
            or (stem and self._by_stem.get(Path(stem).name))
            or self._frame_dirs.get(name)
        )
        if not matches:
            return None
        if len(matches) > 1:
            listed = ", ".join(str(p) for p in sorted(matches)[:4])
            raise DatasetError(f"video id {video_id!r} matches several files under {self.root}: {listed}")
        return matches[0]


@dataclass(frozen=True)
class SkippedSample:
    """A dataset item left out because its video could not be read (``on_error="skip"``)."""

    index: int
    path: str
    reason: str


def collate_skipping(batch: Sequence[Any]) -> dict[str, Any]:
    """``default_collate`` over the items that are not :class:`SkippedSample`; those go to ``"skipped"``.

    A batch whose every item was skipped collates to ``{"skipped": [...]}`` alone.
    """
    skipped = [item for item in batch if isinstance(item, SkippedSample)]
    kept = [item for item in batch if not isinstance(item, SkippedSample)]
    out: dict[str, Any] = dict(default_collate(kept)) if kept else {}
    out["skipped"] = skipped
    return out


def format_skipped(skipped: Iterable[SkippedSample]) -> str:
    """A summary of skipped files, one line each with its reason and how many times it was skipped."""
    skipped = list(skipped)
    if not skipped:
        return "no videos skipped"
    counts = Counter(s.path for s in skipped)
    reasons = {s.path: s.reason for s in skipped}
    lines = [f"{len(counts)} video(s) skipped ({len(skipped)} sample(s)):"]
    lines += [f"  {path} (x{n}): {reasons[path]}" for path, n in sorted(counts.items())]
    return "\n".join(lines)


class VideoClipDataset(Dataset):
    """Base for map-style datasets that decode a sampled clip per item.

    Subclasses implement ``_item(index, rng)``; reading goes through :meth:`_read_clip`. Randomness comes
    from one numpy Generator per process: seeded from ``seed`` in the main process, and from the worker's
    seed (which ``make_loader`` derives from its own seed) in a ``DataLoader`` worker, so runs repeat.
    After :meth:`set_epoch_seed` each item instead draws from its own generator, seeded by
    ``(seed, epoch, index)``: the same draws whichever worker decodes it and whatever it decoded before.
    """

    def __init__(self, on_error: str = "raise", seed: int = 0) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.seed = int(seed)
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple[int, int | None] | None = None
        self._epoch_seed: tuple[int, int] | None = None

    def set_epoch_seed(self, seed: int | None, epoch: int = 0) -> None:
        """Seed each item's random draws (frames, crop, flip) by ``(seed, epoch, index)`` from now on.

        This is what makes `stanvid.training.loop.fit` resumable bit for bit: an item's clip depends on the run's seed,
        the epoch and the item alone, not on which worker process decodes it nor on what that worker decoded
        before, so a resumed run that skips the batches already trained on draws what the uninterrupted run
        drew. Call it in the process that reads the items (inside a ``DataLoader`` worker, on its copy of the
        dataset). ``seed=None`` goes back to the per-process stream.
        """
        if seed is not None and (int(seed) < 0 or int(epoch) < 0):
            raise ConfigError(f"set_epoch_seed: seed and epoch must be >= 0, got {seed}, {epoch}")
        self._epoch_seed = None if seed is None else (int(seed), int(epoch))

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.id)
        if self._rng is None or self._rng_owner != owner:
            seed = self.seed if info is None else info.seed
            self._rng = np.random.default_rng(seed)
            self._rng_owner = owner
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"], state["_rng_owner"] = None, None
        return state

    def _path(self, index: int) -> str:
        raise NotImplementedError

    def _item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def _item_generator(self, index: int) -> np.random.Generator:
        if self._epoch_seed is not None:
            return np.random.default_rng([*self._epoch_seed, int(index)])
        return self._generator()

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        try:
            return self._item(index, self._item_generator(index))
        except VideoReadError as err:
            if self.on_error == "raise":
                raise
            # the loader collects it (`collate_skipping`): a list kept here would live in a worker's copy
            return SkippedSample(index=int(index), path=self._path(index), reason=str(err))

    @staticmethod
    def _read_clip(
        path: str,
        sample: Callable[[int], np.ndarray],
        transform: Callable[..., torch.Tensor],
        rng: np.random.Generator,
    ) -> torch.Tensor:
        """Probe, sample indices from the frame count, decode them (resized in the decoder), transform."""
        from stanvid.video.decode import probe, read_frames

        num_frames = probe(path).num_frames
        if num_frames <= 0:
            raise VideoReadError(f"{path}: no decodable frames")
        indices = sample(num_frames)
        # Inside a DataLoader worker the parallelism is the workers themselves: one decoder thread each.
        threads = 0 if get_worker_info() is None else 1
        size = getattr(transform, "decode_size", None)
        frames = read_frames(path, indices, size=size, threads=threads)  # (N, H, W, 3)
        return transform(frames, rng)
