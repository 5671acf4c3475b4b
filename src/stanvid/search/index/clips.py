"""What the index embeds for a span of a video: the segments of a file, the frames sampled in each, the clip
read from them and its embedding. Query clips go through the same functions, so an indexed span given back
as an example embeds identically."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from stanvid.errors import VideoIndexError, VideoReadError
from stanvid.models.video_clip import VideoCLIP
from stanvid.precision import InferencePrecision, prepare_for_inference
from stanvid.video.sampling import uniform_indices
from stanvid.video.transforms import fit_frames, normalize

MIN_SEGMENT_SECONDS = 0.1  # below a few frames a "segment" repeats one frame num_frames times

MAX_SEGMENTS_PER_FILE = 100_000  # 28 h at 1 s; a file above it is listed as a failure, not indexed


def segment_bounds(
    duration: float, segment_seconds: float | None, *, limit: int = MAX_SEGMENTS_PER_FILE
) -> list[tuple[float, float]]:
    """(start, end) seconds of each segment: consecutive spans of `segment_seconds`, the last one shorter.

    Without `segment_seconds` the whole video is one segment. More than `limit` segments is refused
    (`VideoIndexError`) rather than built: a bogus duration must not turn into gigabytes of tuples.
    """
    if not duration > 0:  # also NaN
        return []
    if segment_seconds is None:
        return [(0.0, float(duration))]
    _check_segment_seconds(segment_seconds, minimum=0.0)
    count = _segment_count(duration, segment_seconds)
    if count > limit:
        raise VideoIndexError(
            f"{duration:g} s in segments of {segment_seconds:g} s is {count} segments; at most {limit} are allowed"
        )
    return [(k * segment_seconds, min((k + 1) * segment_seconds, duration)) for k in range(count)]


def _segment_count(duration: float, segment_seconds: float) -> int:
    ratio = duration / segment_seconds - 1e-9
    return max(1, math.ceil(ratio)) if math.isfinite(ratio) else 1 << 62


def _check_segment_seconds(segment_seconds: float, minimum: float) -> None:
    if isinstance(segment_seconds, bool) or not isinstance(segment_seconds, int | float):
        raise VideoIndexError(f"segment_seconds must be a number of seconds, got {segment_seconds!r}")
    if not (math.isfinite(segment_seconds) and segment_seconds > minimum):
        raise VideoIndexError(
            f"segment_seconds must be a finite number above {minimum:g}, got {segment_seconds}"
        )


def segments_with_frames(
    duration: float,
    fps: float,
    num_frames: int,
    segment_seconds: float | None,
    *,
    limit: int = MAX_SEGMENTS_PER_FILE,
) -> list[tuple[float, float]]:
    """The spans of `segment_bounds(duration, segment_seconds)` that show at least one frame (frame i is shown
    at i / fps), found from the frames rather than by listing every span.

    The work is bounded by what the file holds: a file whose one frame carries a timestamp of 10^10 frames
    has a duration of years but a single non-empty segment, found in microseconds. More than `limit`
    non-empty segments raises `VideoReadError` (the indexer lists the file as a failure with that reason).
    """
    if not duration > 0:
        return []
    if segment_seconds is None or num_frames <= 0 or not (fps > 0 and math.isfinite(fps)):
        return segment_bounds(duration, segment_seconds, limit=limit)
    _check_segment_seconds(segment_seconds, minimum=0.0)
    count = _segment_count(duration, segment_seconds)
    near = np.floor(
        np.arange(num_frames, dtype=np.float64) / (fps * segment_seconds)
    )  # (F,) segment of frame i
    ks = np.unique(np.concatenate([near - 1, near, near + 1]))
    ks = ks[(ks >= 0) & (ks < count)].astype(np.int64)  # (K,) candidates; the exact test below decides
    starts = ks * segment_seconds  # the same float operations as segment_bounds and segment_frame_indices
    ends = np.minimum((ks + 1) * segment_seconds, duration)
    tol = 1e-6 * np.minimum(1.0, (ends - starts) * fps)
    first = np.maximum(0, np.ceil(starts * fps - tol))
    last = np.minimum(num_frames - 1, np.ceil(ends * fps - tol) - 1)
    keep = last >= first
    if int(keep.sum()) > limit:
        raise VideoReadError(
            f"{int(keep.sum())} segments of {segment_seconds:g} s hold frames; at most {limit} per file are "
            f"indexed: use a longer --segment-seconds"
        )
    return [(float(a), float(b)) for a, b in zip(starts[keep], ends[keep], strict=True)]


def segment_frame_indices(
    start: float, end: float, fps: float, num_frames: int, clip_len: int
) -> np.ndarray | None:
    """Indices of `clip_len` frames sampled uniformly (test mode) among the frames shown in [start, end).

    Frame i is shown at i / fps. None when no frame falls in the span (a sliver at the end of a video).
    The rounding tolerance is 1e-6 frame, less for a span shorter than a frame (a file whose timestamps make
    its average rate a few frames per century must not lose its frames to the tolerance).
    """
    tol = 1e-6 * min(1.0, (end - start) * fps)
    first = max(0, math.ceil(start * fps - tol))
    last = min(num_frames - 1, math.ceil(end * fps - tol) - 1)
    if last < first:
        return None
    return first + uniform_indices(last - first + 1, clip_len)  # (clip_len,)


def _clip_frames(frames: torch.Tensor, size: int, fit: tuple[str, str] | None = None) -> torch.Tensor:
    """`(n, H, W, 3)` uint8 decoded frames -> `(n, 3, S, S)`: resized (short side `size`) and centre-cropped
    as every indexed segment is. Indexing and `read_clip` both go through this, so that an indexed span given
    back as a query embeds identically."""
    return fit_frames(frames, size, fit)


def read_clip(
    path: str | os.PathLike, start: float, end: float, *, clip_len: int, image_size: int, fit=None
) -> torch.Tensor:
    """The clip the index would embed for the span [start, end) of a video: `clip_len` frames sampled as a
    segment is, resized and centre-cropped, `(clip_len, 3, S, S)` uint8. Query clips go through this so that
    an indexed span and the same span given as an example embed identically."""
    from stanvid.video.decode import probe, read_frames

    info = probe(path)
    idx = segment_frame_indices(start, end, info.fps, info.num_frames, clip_len)
    if idx is None:
        raise VideoReadError(f"{path}: no frame is shown between {start:.3f} s and {end:.3f} s")
    frames = read_frames(path, idx, size=image_size)  # (T, H, W, 3)
    return _clip_frames(frames, image_size, fit).contiguous()  # (T, 3, S, S)


@torch.inference_mode()
def encode_clips(
    model: VideoCLIP,
    clips: torch.Tensor,
    device: torch.device,
    batch_size: int = 16,
    runner: InferencePrecision | None = None,
) -> np.ndarray:
    """`(n, T, 3, S, S)` uint8 clips -> `(n, D)` float32 L2-normalized video embeddings, as the index stores.

    `runner` (`stanvid.precision.prepare_for_inference(model, ...)`): the precision to encode in; float32 without.
    """
    runner = runner if runner is not None else prepare_for_inference(model, "fp32", device)
    out = [
        encode_batch(runner, clips[k : k + batch_size], device)[0] for k in range(0, len(clips), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, model.config.clip.embed_dim), np.float32)


@torch.inference_mode()
def encode_batch(
    runner: InferencePrecision, clips: torch.Tensor, device: torch.device, frames: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """One forward pass: `(b, T, 3, S, S)` uint8 clips -> `(b, D)` float32 unit vectors whatever the precision
    of the pass, and with `frames` the `(b, T, D)` float32 per-frame vectors they pool (a Mug-STAN index keeps
    them), else None. The index's writer and every query clip go through it, so an indexed span given back
    as a query embeds as it was indexed."""
    model = runner.model
    part = clips.to(device, non_blocking=True)
    b, t = part.shape[:2]
    pre = model.config.clip.preprocess  # the normalization the CLIP was trained with
    video = normalize(part.flatten(0, 1), pre.mean, pre.std).view(b, t, *part.shape[2:])  # (b, T, 3, S, S)
    with runner.autocast():
        if frames:
            per_frame = model.encode_video(video, pool=False)  # (b, T, D)
            emb = model.pool(per_frame)  # (b, D)
        else:
            per_frame, emb = None, model.encode_video(video)  # (b, D)
    kept = None if per_frame is None else per_frame.float().cpu().numpy()
    return F.normalize(emb.float(), dim=-1).cpu().numpy(), kept
