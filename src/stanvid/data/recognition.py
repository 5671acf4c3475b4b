"""Action recognition data: Kinetics-400 and Something-Something v2 annotations, and the clip dataset.

Formats read:

* Kinetics: the official csv (``label,youtube_id,time_start,time_end,split``), videos named
  ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` (also found by bare ``youtube_id``, in per-class
  folders or flat); or mmaction2 lists of ``path label`` lines (label an index or a class name), or of
  ``frame_dir total_frames label`` lines (mmaction2's rawframes lists: the folder of frames is the video). Class
  names come from a file (one per line as mmaction2's ``label_map_k400.txt``, a csv ``id,name`` as
  X-CLIP/ActionCLIP's ``kinetics_400_labels.csv``, or a json) or, for the csv, the sorted label set, which
  is the standard class order when all classes occur.
* Something-Something v2: ``labels.json`` (``{"Approaching something with your camera": "0", ...}``) and
  ``train.json`` / ``validation.json`` (``[{"id", "label", "template", "placeholders"}]``). The class is the
  template with its brackets removed ("Putting [something] into [something]" -> "Putting something into
  something"). Videos are ``{id}.webm``. Horizontal flips are off by default: SSv2 labels such as
  "Pushing something from left to right" change meaning when mirrored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from stanvid.data.base import (
    VideoClipDataset,
    VideoFinder,
    existing_file,
    read_csv_rows,
    read_json,
    read_lines,
    require_field,
)
from stanvid.errors import ConfigError, DatasetError
from stanvid.video.sampling import dense_indices, uniform_indices
from stanvid.video.transforms import MultiCropTransform, TrainTransform

__all__ = [
    "RecognitionAnnotations",
    "RecognitionDataset",
    "read_class_names",
    "load_kinetics",
    "load_ssv2",
]

PathLike = str | os.PathLike


@dataclass
class RecognitionAnnotations:
    """Labelled videos of one split. ``flip_safe`` is False where mirroring changes the label (SSv2).
    ``sources``, when set, gives video ``i`` to decode (a tar shard's member) and ``video_paths`` only name them.
    """

    name: str
    video_ids: list[str]
    video_paths: list[str]
    labels: np.ndarray  # (num_videos,) int64 class index
    classes: list[str] | None
    flip_safe: bool = True
    missing: list[str] = field(default_factory=list)
    sources: Callable[[int], Any] | None = None

    def video_source(self, index: int) -> Any:
        """What to decode for video ``index``: its file, or what ``sources`` gives."""
        return self.video_paths[index] if self.sources is None else self.sources(index)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not len(self.video_ids) == len(self.video_paths) == len(self.labels):
            raise DatasetError(f"{self.name}: video ids, paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.video_ids)


def read_class_names(path: PathLike) -> list[str]:
    """Class names in index order from a .txt (one per line), .csv (``id,name``) or .json file.

    The json may be a list of names or a dict ``{name: index}`` (SSv2's ``labels.json``).
    """
    path = existing_file(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, list):
            names = [str(n) for n in data]
        elif isinstance(data, dict):
            by_index: dict[int, str] = {}
            for name, index in data.items():
                try:
                    by_index[int(index)] = name
                except (TypeError, ValueError):
                    raise DatasetError(f"{path}: entry {name!r}: index {index!r} is not an integer") from None
            names = _dense(by_index, path)
        else:
            raise DatasetError(f"{path}: expected a json list of names or a dict name -> index")
    elif suffix == ".csv":
        by_index = {}
        for where, row in read_csv_rows(path, ["id", "name"]):
            try:
                by_index[int(row["id"])] = row["name"].strip()
            except ValueError:
                raise DatasetError(f"{where}: id {row['id']!r} is not an integer") from None
        names = _dense(by_index, path)
    else:
        names = [line for _, line in read_lines(path)]
    if not names:
        raise DatasetError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: duplicate class names")
    return names


def _dense(by_index: dict[int, str], path: Path) -> list[str]:
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(f"{path}: class indices must be 0..{len(by_index) - 1} without gaps")
    return [by_index[i] for i in range(len(by_index))]


class _LabelledBuilder:
    def __init__(self, name: str, video_root: PathLike, on_missing: str) -> None:
        if on_missing not in ("raise", "skip"):
            raise ConfigError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
        self.name, self.on_missing = name, on_missing
        self.finder = VideoFinder(video_root)
        self.video_ids: list[str] = []
        self.video_paths: list[str] = []
        self.labels: list[int] = []
        self.missing: list[str] = []

    def add(self, video_id: str, label: int, where: str, names: tuple[str, ...]) -> None:
        path = None
        for name in names:
            path = self.finder.find(name)
            if path is not None:
                break
        if path is None:
            message = f"{where}: no video file for {', '.join(map(repr, names))} under {self.finder.root}"
            if self.on_missing == "raise":
                raise DatasetError(message)
            self.missing.append(message)
            return
        self.video_ids.append(video_id)
        self.video_paths.append(str(path))
        self.labels.append(label)

    def build(self, source: str, classes: list[str] | None, flip_safe: bool = True) -> RecognitionAnnotations:
        if not self.video_ids:
            detail = f" ({len(self.missing)} missing, e.g. {self.missing[0]})" if self.missing else ""
            raise DatasetError(f"{source}: no videos{detail}")
        return RecognitionAnnotations(
            self.name, self.video_ids, self.video_paths, self.labels, classes, flip_safe, self.missing
        )


def load_kinetics(
    annotations: PathLike,
    video_root: PathLike,
    classes: PathLike | list[str] | None = None,
    on_missing: str = "raise",
) -> RecognitionAnnotations:
    """Kinetics from the official csv or a ``path label`` list (see the module docstring)."""
    annotations = existing_file(annotations)
    names = read_class_names(classes) if isinstance(classes, (str, os.PathLike)) else classes
    builder = _LabelledBuilder(f"kinetics:{annotations.name}", video_root, on_missing)
    if annotations.suffix.lower() == ".csv":
        rows = list(read_csv_rows(annotations, ["label", "youtube_id", "time_start", "time_end"]))
        if names is None:
            names = sorted({row["label"].strip() for _, row in rows})
        index = {name: i for i, name in enumerate(names)}
        for where, row in rows:
            label = row["label"].strip()
            if label not in index:
                raise DatasetError(f"{where}: label {label!r} is not a known class")
            youtube_id = row["youtube_id"].strip()
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise DatasetError(f"{where}: time_start/time_end must be numbers") from None
            clip = f"{youtube_id}_{start:06d}_{end:06d}"
            builder.add(clip, index[label], where, (clip, youtube_id))
        return builder.build(str(annotations), names)

    index = {name: i for i, name in enumerate(names or [])}
    for where, line in read_lines(annotations):
        parts = line.rsplit(maxsplit=2)
        if len(parts) == 3 and parts[1].isdecimal():  # rawframes: frame_dir total_frames label
            parts = [parts[0], parts[2]]
        else:
            parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected '<path> <label>', got {line!r}")
        video, label_text = parts
        if label_text.lstrip("-").isdecimal():
            label = int(label_text)
            if label < 0 or (names is not None and label >= len(names)):
                raise DatasetError(f"{where}: label {label} is not a class index (0..{len(names or []) - 1})")
        elif label_text in index:
            label = index[label_text]
        else:
            raise DatasetError(f"{where}: label {label_text!r} is neither an index nor a known class name")
        builder.add(video, label, where, (video,))
    return builder.build(str(annotations), names)


def load_ssv2(
    annotations_json: PathLike, labels_json: PathLike, video_root: PathLike, on_missing: str = "raise"
) -> RecognitionAnnotations:
    """Something-Something v2 (``train.json`` / ``validation.json`` with ``labels.json``)."""
    classes = read_class_names(labels_json)
    index = {name: i for i, name in enumerate(classes)}
    data = read_json(annotations_json)
    if not isinstance(data, list):
        raise DatasetError(
            f"{annotations_json}: expected a json list of {{id, label, template, placeholders}}"
        )
    builder = _LabelledBuilder(f"ssv2:{Path(annotations_json).name}", video_root, on_missing)
    for i, entry in enumerate(data):
        where = f"{annotations_json}: entry {i}"
        video_id = str(require_field(entry, "id", where))
        template = require_field(entry, "template", where)
        if not isinstance(template, str):
            raise DatasetError(f"{where}: template must be a string, got {template!r}")
        name = template.replace("[", "").replace("]", "")
        if name not in index:
            raise DatasetError(f"{where}: template {template!r} ({name!r}) is not a class of {labels_json}")
        builder.add(video_id, index[name], f"{where} (id {video_id})", (f"{video_id}.webm", video_id))
    return builder.build(str(annotations_json), classes, flip_safe=False)


class RecognitionDataset(VideoClipDataset):
    """Clips with class labels for training and multi-view testing.

    Items: ``video`` float ``(T, 3, S, S)``, or ``(V, T, 3, S, S)`` with ``V = num_clips * num_crops`` test
    views (clip-major); ``label`` int; ``video_id``; ``index``.

    Args:
        annotations: from :func:`load_kinetics` or :func:`load_ssv2`.
        num_frames: frames per clip (8 or 16 in the paper).
        train: random frames and augmentation (one clip, one crop).
        sampling: ``"uniform"`` (one frame per segment, as STAN/X-CLIP) or ``"dense"`` (``frame_interval``
            apart, as 8x8 / 16x4 SlowFast-style clips).
        frame_interval: step between frames for ``"dense"``.
        num_clips: temporal test views; ``num_crops``: spatial test views (1 centre or 3 along the long side).
        transform: override of the clip transform ``(frames, rng) -> (T, 3, S, S)`` or ``(crops, T, 3, S, S)``;
            default in training: short side ``256 / 224 * image_size``, random resized crop, flip (mmaction2's
            Kinetics recipe); in testing: shortest side ``image_size`` and ``num_crops`` crops.
        flip: horizontal flip in training; default: ``annotations.flip_safe`` (off for SSv2).
    """

    def __init__(
        self,
        annotations: RecognitionAnnotations,
        *,
        num_frames: int = 8,
        train: bool = False,
        sampling: str = "uniform",
        frame_interval: int = 1,
        num_clips: int = 1,
        num_crops: int = 1,
        transform: Any = None,
        image_size: int = 224,
        flip: bool | None = None,
        on_error: str = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__(on_error=on_error, seed=seed)
        if sampling not in ("uniform", "dense"):
            raise ConfigError(f"sampling must be 'uniform' or 'dense', got {sampling!r}")
        if train and (num_clips != 1 or num_crops != 1):
            raise ConfigError("training takes one clip and one crop per video (num_clips=1, num_crops=1)")
        self.annotations = annotations
        self.num_frames = int(num_frames)
        self.train = bool(train)
        self.sampling = sampling
        self.frame_interval = int(frame_interval)
        self.num_clips = int(num_clips)
        self.num_crops = int(num_crops)
        self.flip = annotations.flip_safe if flip is None else bool(flip)
        if transform is None:
            if train:
                transform = TrainTransform(
                    size=image_size, short_side=round(image_size * 256 / 224), flip=self.flip
                )
            else:
                transform = MultiCropTransform(size=image_size, num_crops=num_crops)
        self.transform = transform
        # Fail on bad sampler arguments now, not in a worker.
        self._sample(max(self.num_frames * self.frame_interval, 1), np.random.default_rng(0))

    def __len__(self) -> int:
        return len(self.annotations)

    def _path(self, index: int) -> str:
        return self.annotations.video_paths[index]

    def _sample(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        mode = "train" if self.train else "test"
        if self.sampling == "uniform":
            return uniform_indices(num_frames, self.num_frames, self.num_clips, mode=mode, rng=rng)
        return dense_indices(
            num_frames, self.num_frames, self.frame_interval, self.num_clips, mode=mode, rng=rng
        )

    def _item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        source = self.annotations.video_source(index)
        out = self._read_clip(source, partial(self._sample, rng=rng), self.transform, rng)
        # (clips * T, 3, S, S) or (crops, clips * T, 3, S, S) -> (V, T, 3, S, S), clip-major
        crops = out.unsqueeze(0) if out.dim() == 4 else out
        n_crops, t = crops.shape[0], self.num_frames
        views = crops.view(n_crops, self.num_clips, t, *crops.shape[2:]).transpose(0, 1).flatten(0, 1)
        video = views[0] if views.shape[0] == 1 else views
        return {
            "video": video,
            "label": int(self.annotations.labels[index]),
            "video_id": self.annotations.video_ids[index],
            "index": int(index),
            "path": self.annotations.video_paths[index],  # named when training stops at a non-finite loss
        }
