"""Videos decoded once and held in memory, read again without decoding.

A corpus small enough to sit in memory (the demo's ~1,400 clips of 17 frames at 32x32 are ~70 MB as uint8)
is cheaper to decode once than once per item per epoch in worker processes. A `DecodedVideo` keeps every frame
of a file exactly as `read_frames` returned it: ``DecodedVideo(read_frames(path, range(n)), str(path), fps)``
with ``n`` and ``fps`` from `probe` (`stanvid.demo.synth.Corpus.hold` does this). Handed to a dataset in place
of the file (`stanvid.data.RetrievalAnnotations.sources`), `probe` and `read_frames` serve it as they serve
the file, with the same frames and the same index checks, so a dataset's items are identical to those read
from the file and nothing is decoded again.
"""

from __future__ import annotations

import numpy as np
import torch

from stanvid.errors import ConfigError

__all__ = ["DecodedVideo"]


class DecodedVideo:
    """Every frame of one video, ``(F, H, W, 3)`` uint8 RGB as `read_frames` gives them, with the name that
    messages give it and the frame rate that `probe` reports.

    `read_frames` reads it at its own size only (``size=None`` or its shortest side): scaling held frames
    again would not give the frames a decoder scales, so another size is refused rather than approximated.
    """

    def __init__(self, frames: torch.Tensor, name: str = "<decoded video>", fps: float = 30.0) -> None:
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            raise ConfigError(f"{name}: DecodedVideo holds a uint8 tensor, got {type(frames).__name__}")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ConfigError(
                f"{name}: DecodedVideo frames must be (F >= 1, H, W, 3), got {tuple(frames.shape)}"
            )
        if not fps > 0:
            raise ConfigError(f"{name}: fps must be positive, got {fps!r}")
        self.frames = frames.contiguous()  # (F, H, W, 3)
        self.name = str(name)
        self.fps = float(fps)

    @property
    def nbytes(self) -> int:
        return self.frames.numel()

    def select(self, indices: np.ndarray, size: int | None = None) -> torch.Tensor:
        """Frames ``indices`` (int64, already checked against the frame count by `read_frames`),
        ``(K, H, W, 3)`` uint8, a copy."""
        height, width = self.frames.shape[1:3]
        if size is not None and size != min(height, width):
            raise ConfigError(
                f"{self.name}: the held frames are {width}x{height}; read them at their own size (size None or "
                f"{min(height, width)}), or decode the file again at size {size}"
            )
        return self.frames[torch.from_numpy(np.asarray(indices, dtype=np.int64))]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        n, height, width = self.frames.shape[:3]
        return f"DecodedVideo({self.name!r}, {n} frames of {width}x{height})"
