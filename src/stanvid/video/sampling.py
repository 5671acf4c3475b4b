"""Frame-index samplers: pure functions of (frame count, parameters, random generator).

They return 0-based indices into the decoded frame sequence, flattened clip-major: clip ``k`` occupies
``out[k * clip_len:(k + 1) * clip_len]``. Nothing here touches a file, so the same indices can be checked
against the reference and handed to ``stanvid.read_frames``.

Two families:

* ``uniform_indices``: the official STAN ``UniformSample`` (mmaction2, after PySlowFast's SSv2 sampler),
  which splits the video into ``clip_len`` equal segments. Retrieval (12 frames, 64 for DiDeMo) uses it.
* ``dense_indices``: mmaction2's ``SampleFrames`` (Kinetics-style ``clip_len x frame_interval`` clips such
  as 8x8 or 16x4), with several evenly spread clips as test views.
"""

from __future__ import annotations

import numpy as np

from stanvid.errors import ConfigError

__all__ = ["uniform_indices", "dense_indices", "as_generator"]

_MODES = ("train", "test")


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator (returned as is), an int seed, or None (fresh entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise ConfigError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an int, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")


def uniform_indices(
    num_frames: int,
    clip_len: int,
    num_clips: int = 1,
    mode: str = "test",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Segment-based sampling of ``clip_len`` frames, as the official ``UniformSample``.

    The frame range ``[0, num_frames - 1]`` is cut into ``clip_len`` segments of ``seg = (num_frames - 1) /
    clip_len`` frames; segment ``i`` spans ``[round(seg * i), round(seg * (i + 1))]`` (numpy rounding, half
    to even).

    * test: clip ``k`` of ``num_clips`` takes ``round(seg * i) + int(seg / (num_clips + 1) * (k + 1))``, so
      the clips are evenly shifted inside each segment and the result is deterministic.
    * train: one index drawn uniformly from each segment, both ends included. The official code ignores
      ``num_clips`` in training (one clip); here each of the ``num_clips`` clips is an independent draw.

    Short videos (``num_frames < clip_len``) repeat frames rather than loop, as the reference does.

    Returns:
        int64 array of shape ``(num_clips * clip_len,)``, clip-major.
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len, num_clips=num_clips)
    _check_mode(mode)
    seg_size = float(num_frames - 1) / clip_len
    starts = np.round(seg_size * np.arange(clip_len)).astype(np.int64)  # (clip_len,)
    if mode == "test":
        shift = seg_size / (num_clips + 1)
        offsets = np.array([int(shift * (k + 1)) for k in range(num_clips)], dtype=np.int64)
        return (offsets[:, None] + starts[None, :]).reshape(-1)  # (num_clips * clip_len,)
    ends = np.round(seg_size * np.arange(1, clip_len + 1)).astype(np.int64)  # (clip_len,)
    gen = as_generator(rng)
    draws = gen.integers(starts, ends + 1, size=(num_clips, clip_len))  # (num_clips, clip_len)
    return draws.astype(np.int64).reshape(-1)


def dense_indices(
    num_frames: int,
    clip_len: int,
    frame_interval: int = 1,
    num_clips: int = 1,
    mode: str = "test",
    rng: np.random.Generator | int | None = None,
    out_of_bound: str = "loop",
) -> np.ndarray:
    """Clips of ``clip_len`` frames, ``frame_interval`` apart (mmaction2 ``SampleFrames``).

    * train: the video is split into ``num_clips`` equal spans and each clip starts at a random offset
      within its span (``avg = (num_frames - clip_len * frame_interval + 1) // num_clips``); for videos too
      short for that, random sorted starts, then evenly rounded starts, then zeros, as mmaction2 does.
    * test: with one clip, the clip is centred (``start = max_offset // 2``); with several, the starts are
      spread evenly from the first frame to the last possible start (``round(k * max_offset / (n - 1))``),
      which is how the "N clips x 3 crops" test views of Kinetics are taken.

    Indices past the end wrap around (``out_of_bound="loop"``, the mmaction2 default) or repeat the clip's
    last valid frame (``"repeat_last"``).

    Returns:
        int64 array of shape ``(num_clips * clip_len,)``, clip-major.
    """
    _check_positive(
        num_frames=num_frames, clip_len=clip_len, frame_interval=frame_interval, num_clips=num_clips
    )
    _check_mode(mode)
    if out_of_bound not in ("loop", "repeat_last"):
        raise ConfigError(f"out_of_bound must be 'loop' or 'repeat_last', got {out_of_bound!r}")

    if mode == "test":
        span = (clip_len - 1) * frame_interval + 1
        max_offset = max(num_frames - span, 0)
        if num_clips > 1:
            starts = np.round(np.arange(num_clips) * (max_offset / (num_clips - 1)))
        else:
            starts = np.array([max_offset // 2])
    else:
        span = clip_len * frame_interval
        gen = as_generator(rng)
        avg_interval = (num_frames - span + 1) // num_clips
        if avg_interval > 0:
            starts = np.arange(num_clips) * avg_interval + gen.integers(0, avg_interval, size=num_clips)
        elif num_frames > max(num_clips, span):
            starts = np.sort(gen.integers(0, num_frames - span + 1, size=num_clips))
        elif avg_interval == 0:
            starts = np.around(np.arange(num_clips) * ((num_frames - span + 1.0) / num_clips))
        else:
            starts = np.zeros(num_clips)
    starts = starts.astype(np.int64)
    inds = (
        starts[:, None] + np.arange(clip_len, dtype=np.int64)[None, :] * frame_interval
    )  # (clips, clip_len)

    if out_of_bound == "loop":
        inds = np.mod(inds, num_frames)
    else:
        valid = inds < num_frames
        last_valid = np.max(np.where(valid, inds, 0), axis=1, keepdims=True)  # (clips, 1)
        inds = np.where(valid, inds, last_valid)
    return inds.reshape(-1)
