"""Video-text retrieval data: the parsed annotations and the dataset that decodes clips for them.

``RetrievalAnnotations`` is what every format reader in :mod:`stanvid.data.retrieval_formats` returns: the
videos (ids and resolved files), the captions, and ``text_to_video`` (caption i describes video
``text_to_video[i]``). Datasets with several captions per video (MSR-VTT train, MSVD, LSMDC) keep every
caption as its own query; paragraph datasets (DiDeMo, ActivityNet) join a video's sentences into one.

``RetrievalDataset`` serves it two ways:

* ``unit="caption"``: one item per caption, the video decoded for each (the official STAN training set
  expands every caption into its own sample; with one caption per video, as the MSR-VTT 1k-A test, it is
  also the evaluation set).
* ``unit="video"``: one item per video. In training a caption is drawn at random per item (CLIP4Clip's
  ``unfold_sentences=False``); in evaluation the item has no text, and the queries are
  ``dataset.text_tokens()`` with ``dataset.text_to_video`` telling the evaluator which video each matches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from stanvid.data.base import VideoClipDataset
from stanvid.errors import ConfigError, DatasetError
from stanvid.video.sampling import uniform_indices
from stanvid.video.transforms import EvalTransform, stan_train_transform

__all__ = ["RetrievalAnnotations", "RetrievalDataset"]


@dataclass
class RetrievalAnnotations:
    """Videos and captions of one split. ``missing`` lists videos left out with ``on_missing="skip"``.
    ``sources``, when set, gives video ``i`` to decode (a tar shard's member) and ``video_paths`` only name them.
    """

    name: str
    video_ids: list[str]
    video_paths: list[str]
    captions: list[str]
    text_to_video: np.ndarray  # (num_captions,) int64 index into video_ids
    missing: list[str] = field(default_factory=list)
    sources: Callable[[int], Any] | None = None

    def video_source(self, index: int) -> Any:
        """What to decode for video ``index``: its file, or what ``sources`` gives."""
        return self.video_paths[index] if self.sources is None else self.sources(index)

    def __post_init__(self) -> None:
        self.text_to_video = np.asarray(self.text_to_video, dtype=np.int64)
        if len(self.video_ids) != len(self.video_paths):
            raise DatasetError(
                f"{self.name}: {len(self.video_ids)} video ids but {len(self.video_paths)} paths"
            )
        if self.text_to_video.shape != (len(self.captions),):
            raise DatasetError(f"{self.name}: text_to_video must have one entry per caption")
        if len(self.captions) and not (
            0 <= self.text_to_video.min() and self.text_to_video.max() < len(self.video_ids)
        ):
            raise DatasetError(f"{self.name}: text_to_video points outside the {len(self.video_ids)} videos")

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def video_to_texts(self) -> list[list[int]]:
        """For each video, the indices of its captions (in annotation order)."""
        out: list[list[int]] = [[] for _ in self.video_ids]
        for text_index, video_index in enumerate(self.text_to_video.tolist()):
            out[video_index].append(text_index)
        return out


class RetrievalDataset(VideoClipDataset):
    """Clips and captions for retrieval training and evaluation.

    Items are dicts: ``video`` float ``(T, 3, S, S)`` (CLIP-normalized), ``video_id``, ``video_index``, and,
    when the item carries text, ``tokens`` LongTensor ``(context_length,)``, ``caption``, ``caption_index``.

    Args:
        annotations: from a reader in :mod:`stanvid.data.retrieval_formats`.
        num_frames: frames per clip, sampled with :func:`stanvid.uniform_indices` (random per segment in
            training, fixed in evaluation): 12 for MSR-VTT and LSMDC, 64 for DiDeMo in the paper.
        train: training mode (random frames, augmentation, random caption with ``unit="video"``).
        unit: ``"caption"`` or ``"video"`` (see the module docstring).
        transform: clip transform taking ``(frames, rng)``; default ``stan_train_transform(image_size)`` in
            training and ``EvalTransform(image_size)`` otherwise.
        context_length: token ids per caption (32 in the STAN recipes, 77 for DiDeMo).
        tokenizer: ``(texts, context_length) -> LongTensor``; default :func:`stanvid.tokenize`.
        on_error: ``"raise"`` or ``"skip"`` for videos that fail to decode (see :mod:`stanvid.data.base`).
        seed: seed of the random draws in the main process.
    """

    def __init__(
        self,
        annotations: RetrievalAnnotations,
        *,
        num_frames: int = 12,
        train: bool = False,
        unit: str = "caption",
        transform: Callable[..., torch.Tensor] | None = None,
        image_size: int = 224,
        context_length: int = 32,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        on_error: str = "raise",
        seed: int = 0,
    ) -> None:
        super().__init__(on_error=on_error, seed=seed)
        if unit not in ("caption", "video"):
            raise ConfigError(f"unit must be 'caption' or 'video', got {unit!r}")
        if num_frames <= 0:
            raise ConfigError(f"num_frames must be positive, got {num_frames}")
        if annotations.num_captions == 0:
            raise ConfigError(f"{annotations.name}: no captions to serve")
        self.annotations = annotations
        self.num_frames = int(num_frames)
        self.train = bool(train)
        self.unit = unit
        self.transform = transform or (
            stan_train_transform(image_size) if train else EvalTransform(image_size)
        )
        self.context_length = int(context_length)
        self._tokenizer = tokenizer
        self._video_texts = annotations.video_to_texts()

    @property
    def text_to_video(self) -> np.ndarray:
        """``(num_captions,)`` video index of every caption (the ground truth of text-to-video retrieval)."""
        return self.annotations.text_to_video

    @property
    def captions(self) -> list[str]:
        return self.annotations.captions

    @property
    def video_ids(self) -> list[str]:
        return self.annotations.video_ids

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from stanvid.models.tokenizer import tokenize

            return tokenize(texts, context_length=self.context_length)
        return self._tokenizer(texts, context_length=self.context_length)

    def text_tokens(self) -> torch.Tensor:
        """All captions as token ids ``(num_captions, context_length)``, in ``text_to_video`` order."""
        return self.tokenize(self.annotations.captions)

    def __len__(self) -> int:
        return self.annotations.num_captions if self.unit == "caption" else self.annotations.num_videos

    def _indices(self, index: int, rng: np.random.Generator) -> tuple[int, int | None]:
        """(video index, caption index or None) of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.unit == "caption":
            return int(self.annotations.text_to_video[index]), int(index)
        if not self.train:
            return int(index), None
        texts = self._video_texts[index]
        return int(index), (int(texts[rng.integers(len(texts))]) if texts else None)

    def _path(self, index: int) -> str:
        if self.unit == "caption":
            return self.annotations.video_paths[int(self.annotations.text_to_video[index])]
        return self.annotations.video_paths[index]

    def _item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        video_index, caption_index = self._indices(index, rng)
        mode = "train" if self.train else "test"
        sample = partial(uniform_indices, clip_len=self.num_frames, mode=mode, rng=rng)
        video = self._read_clip(self.annotations.video_source(video_index), sample, self.transform, rng)
        item: dict[str, Any] = {
            "video": video,
            "video_id": self.annotations.video_ids[video_index],
            "video_index": video_index,
            "path": self.annotations.video_paths[
                video_index
            ],  # named when training stops at a non-finite loss
        }
        if caption_index is not None:
            caption = self.annotations.captions[caption_index]
            item["tokens"] = self.tokenize([caption])[0]  # (context_length,)
            item["caption"] = caption
            item["caption_index"] = caption_index
        return item
