"""Frame folders: a folder of images read as the frames of one video.

Many copies of Kinetics and Something-Something circulate as mmaction2's "rawframes" (``img_00001.jpg``, ...
one folder per video), and people extract frames themselves to train from them (CLIP4Clip #84, Cap4Video #17).
Wherever stanvid takes a video path, a folder of images is such a video: `stanvid.probe` and
`stanvid.read_frames` accept one (`stanvid.video.decode` dispatches here), so every dataset samples and
transforms its frames exactly as it does a file's.

Frame ``i`` is the ``i``-th image in natural order of the file names (``img_9.png`` before ``img_10.png``;
zero-padded names sort the same either way). Images are the files ending in one of `IMAGE_EXTENSIONS` (any
case); hidden files and anything else in the folder (an ``.npy`` of flow, a ``labels.txt``) are ignored. Every
image must have the first one's size. A folder has no frame rate of its own: it is the one the caller gives
(``data.frame_rate`` in a recipe), `FRAME_FOLDER_FPS` by default; sampling is by frame index, so it only
changes the reported fps and duration (and the rate `stanvid shard` encodes a folder at).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from stanvid.errors import VideoReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FRAME_FOLDER_FPS",
    "is_frame_folder",
    "is_image",
    "frame_files",
    "image_size",
    "read_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# the default frame rate of a folder of frames: that of most Kinetics and phone videos (mmaction2 extracts
# rawframes at the source rate, which it does not record)
FRAME_FOLDER_FPS = 30.0

_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str) -> tuple:
    """``img_10.png`` after ``img_9.png``: digit runs compare as numbers, the rest as text (then the name)."""
    parts = _DIGITS.split(name)
    return tuple((0, int(p), "") if i % 2 else (1, 0, p) for i, p in enumerate(parts)), name


def is_image(name: str) -> bool:
    """Whether a file name is a frame's: not hidden, ending in one of `IMAGE_EXTENSIONS` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def is_frame_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding at least one image (see the module docstring)."""
    try:
        with os.scandir(path) as entries:
            return any(is_image(e.name) and e.is_file() for e in entries)
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        return False


def frame_files(path: str | os.PathLike) -> list[Path]:
    """The images of a frame folder in frame order; `VideoReadError` naming the folder when it has none.

    Cached per process, keyed on the folder's modification time (adding or removing a frame changes it)."""
    path = os.fspath(path)
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise VideoReadError(f"{path}: cannot read the frame folder ({exc.strerror or exc})") from None
    return list(_cached_files(os.path.realpath(path), mtime, path))


@functools.lru_cache(maxsize=256)
def _cached_files(real: str, mtime_ns: int, path: str) -> tuple[Path, ...]:
    with os.scandir(path) as entries:
        names = [e.name for e in entries if is_image(e.name) and e.is_file()]
    if not names:
        raise VideoReadError(f"{path}: a folder without images ({', '.join(IMAGE_EXTENSIONS)}): not a video")
    return tuple(Path(path) / name for name in sorted(names, key=_natural_key))


def image_size(file: Path) -> tuple[int, int]:
    """(width, height) of one image, from its header."""
    try:
        with Image.open(file) as img:
            return img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise VideoReadError(f"{file}: not a readable image ({exc})") from None


def read_images(
    files: Sequence[Path], indices: np.ndarray, expect: tuple[int, int], out: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Images ``indices`` (unique) of ``files`` as RGB ``(H, W, 3)`` uint8, resized to ``out`` (w, h) when it
    differs from their size ``expect`` (w, h), with the bicubic scaler `read_frames` uses for videos."""
    frames = {}
    for i in indices.tolist():
        file = files[i]
        try:
            with Image.open(file) as img:
                rgb = np.asarray(img.convert("RGB"))  # (H, W, 3)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise VideoReadError(f"{file}: frame {i} is not a readable image ({exc})") from None
        if (rgb.shape[1], rgb.shape[0]) != expect:
            raise VideoReadError(
                f"{file}: frame {i} is {rgb.shape[1]}x{rgb.shape[0]} but the first frame is "
                f"{expect[0]}x{expect[1]}; the images of a frame folder must share one size"
            )
        if out != expect:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            rgb = frame.reformat(
                width=out[0], height=out[1], format="rgb24", interpolation="BICUBIC"
            ).to_ndarray()
        frames[i] = rgb
    return frames
