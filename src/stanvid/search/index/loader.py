"""Decoding ahead of the model: the files to encode as chunks of uint8 clips, in DataLoader workers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stanvid.errors import VideoReadError
from stanvid.search.index.clips import _clip_frames, segment_frame_indices, segments_with_frames
from stanvid.search.index.records import _FileEntry
from stanvid.search.moments import moment_windows


@dataclass
class _Chunk:
    """Up to `batch_size` decoded segments of one file, as produced by the loader (possibly in a worker)."""

    entry: _FileEntry
    meta: dict[str, Any] | None = None  # duration, fps, num_frames, width, height
    spans: list[tuple[float, float]] = field(default_factory=list)
    clips: torch.Tensor | None = None  # (n, T, 3, S, S) uint8
    last: bool = False
    error: str | None = None
    moments: bool = False  # the clips are moment samples (`stanvid.search.moments`), not segments


class _ClipLoader(torch.utils.data.IterableDataset):
    """Decodes the files it is given into chunks of uniformly sampled, resized and centre-cropped clips.

    Normalization to float happens in the consumer, so workers pass uint8 (4x less shared memory).
    """

    def __init__(
        self,
        root: Path,
        entries: Sequence[_FileEntry],
        *,
        clip_len: int,
        image_size: int,
        segment_seconds: float | None,
        chunk: int,
        decoder_threads: int,
        moment_step: float | None = None,
        fit: tuple[str, str] | None = None,
    ) -> None:
        self.fit = fit
        self.root, self.entries = root, list(entries)
        self.clip_len, self.image_size = clip_len, image_size
        self.segment_seconds, self.chunk = segment_seconds, chunk
        self.decoder_threads = decoder_threads
        self.moment_step = moment_step  # None: no moment features

    def __iter__(self) -> Iterator[_Chunk]:
        info = torch.utils.data.get_worker_info()
        entries = self.entries if info is None else self.entries[info.id :: info.num_workers]
        threads = self.decoder_threads if info is None else 1
        for entry in entries:
            yield from self._file_chunks(entry, threads)

    def _file_chunks(self, entry: _FileEntry, threads: int) -> Iterator[_Chunk]:
        from stanvid.video.decode import probe, read_frames
        from stanvid.video.tags import container_tags

        path = self.root / entry.relpath
        try:
            info = probe(path)
            meta = {
                "duration": info.duration,
                "fps": info.fps,
                "num_frames": info.num_frames,
                "width": info.width,
                "height": info.height,
            }
            tags = container_tags(path)
            meta.update(created=tags.created, title=tags.title, tags=1)
            spans, indices = [], []
            for start, end in segments_with_frames(
                info.duration, info.fps, info.num_frames, self.segment_seconds
            ):
                idx = segment_frame_indices(start, end, info.fps, info.num_frames, self.clip_len)
                if idx is not None:
                    spans.append((start, end))
                    indices.append(idx)
            if not spans:
                raise VideoReadError(f"{path}: no frames to sample (duration {info.duration:.3f} s)")
            windows = np.zeros((0, self.clip_len), np.int64)
            if self.moment_step is not None:
                times, windows = moment_windows(
                    info.duration, info.fps, info.num_frames, self.clip_len, self.moment_step
                )
                meta["moment_samples"], meta["moment_step"] = len(times), self.moment_step
            groups = [(False, spans[k : k + self.chunk], indices[k : k + self.chunk])
                      for k in range(0, len(spans), self.chunk)]  # fmt: skip
            groups += [
                (True, [], list(windows[k : k + self.chunk])) for k in range(0, len(windows), self.chunk)
            ]
            for n, (moments, part_spans, part) in enumerate(groups):
                frames = read_frames(path, np.concatenate(part), size=self.image_size, threads=threads)
                frames = _clip_frames(frames, self.image_size, self.fit)  # (n*T, 3, S, S)
                clips = frames.reshape(-1, self.clip_len, *frames.shape[1:]).contiguous()  # (n, T, 3, S, S)
                yield _Chunk(entry, meta, part_spans, clips, n == len(groups) - 1, moments=moments)
        except VideoReadError as exc:
            message = str(exc)  # names the file already; the report lists the path once
            yield _Chunk(entry, error=message.removeprefix(f"{path}: "))
