"""Cutting moments out: the frames of a span of a video written as a file of their own (PyAV).

`export_moment(src, start, end, out_dir)` writes the frames shown in [start, end) seconds of `src`'s video stream
(times relative to its first frame, as the index counts them), frame-exact: exactly those frames, in order.

* **Stream copy** when the cut falls on keyframes: the first frame kept is a keyframe, the first frame after the
  span is a keyframe (or the span runs to the end), and the packets between them in decode order are exactly the
  kept frames (no open-GOP frame needs a reference outside). The packets are copied unchanged, so the frames are
  bit-identical and nothing is lost.
* **Re-encoded** otherwise: decoding starts at the keyframe before the span, the kept frames are encoded with
  H.264 (`libx264`, CRF `CRF`, their timestamps kept: a variable frame rate stays one).

Either way the display rotation of the source (a phone's portrait video) is written on the new stream, so the
cut plays upright where the source does. Only the video stream is written. The file is named after its source
and the span (`beach_5.250-8.500.mp4`, the source's container) and written atomically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from stanvid.errors import VideoReadError
from stanvid.fileio import atomic_path

__all__ = ["CRF", "ExportedMoment", "export_moment", "moment_file_name"]

CRF = 17  # H.264 quality of a re-encoded cut (visually lossless)

_EPS = 1e-6  # seconds: a frame shown at `start` (to rounding) is in the span


@dataclass(frozen=True)
class ExportedMoment:
    """A written cut: its path, how it was made ("copy" or "encode"), and the source frames it holds
    (`first` .. `first + frames - 1`, in presentation order)."""

    path: Path
    method: str
    first: int
    frames: int


def moment_file_name(source: str | os.PathLike, start: float, end: float) -> str:
    """`<stem>_<start>-<end><suffix>` with the times in seconds to the millisecond."""
    src = Path(source)
    return f"{src.stem}_{start:.3f}-{end:.3f}{src.suffix.lower() or '.mp4'}"


@dataclass
class _Stream:
    """The video packets of a file in decode order: presentation and decode times, keyframe flags."""

    pts: np.ndarray  # (P,) int64, decode order
    key: np.ndarray  # (P,) bool
    time_base: Fraction
    rotation: float

    def order(self) -> np.ndarray:
        """(P,) packet positions in presentation order."""
        return np.argsort(self.pts, kind="stable")


def _scan(container: av.container.InputContainer, path: str) -> _Stream:
    stream = container.streams.video[0]
    pts, key, rotation = [], [], None
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:  # end-of-stream marker, or a packet without a time
            continue
        if rotation is None:
            rotation = _rotation(stream, packet)
        pts.append(packet.pts)
        key.append(packet.is_keyframe)
    if not pts:
        raise VideoReadError(f"{path}: no video frames")
    return _Stream(np.array(pts, np.int64), np.array(key, bool), stream.time_base, rotation or 0.0)


def _rotation(stream: av.video.stream.VideoStream, packet: av.Packet) -> float:
    """The display rotation on the frame the first packet decodes to (FFmpeg puts the container's display
    matrix on every frame); 0 when it does not decode alone."""
    cc = stream.codec_context
    try:
        frames = cc.decode(packet) + cc.decode(None)
    except av.error.FFmpegError:
        return 0.0
    return float(frames[0].rotation) if frames else 0.0


def export_moment(
    source: str | os.PathLike | BinaryIO,
    start: float,
    end: float,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
) -> ExportedMoment:
    """Write the frames shown in [start, end) seconds of `source` (a path, or a file opened for reading: the
    server passes the descriptor it checked) to `out_dir` (see the module docstring), named after `name`
    (default: the source's path). A span that holds no frame, or an unreadable source, is a `VideoReadError`
    naming the file."""
    src = name or (
        os.fspath(source) if isinstance(source, str | os.PathLike) else getattr(source, "name", "video")
    )
    src = str(src)
    if not (math.isfinite(start) and math.isfinite(end) and end > start >= 0):
        raise VideoReadError(f"{src}: the span {start:g}-{end:g} s is empty")
    out = Path(out_dir) / moment_file_name(src, start, end)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(source if not isinstance(source, os.PathLike) else os.fspath(source)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{src}: no video stream")
            scan = _scan(container, src)
            order = scan.order()  # presentation order -> packet position
            shown = (scan.pts[order] - scan.pts[order[0]]) * float(scan.time_base)  # (P,) seconds
            first = int(np.searchsorted(shown, start - _EPS))
            stop = int(np.searchsorted(shown, end - _EPS))
            if stop <= first:
                raise VideoReadError(f"{src}: no frame is shown between {start:.3f} s and {end:.3f} s")
            copy = _copyable(scan, order, first, stop)
            with atomic_path(out, f".{out.stem}.partial{out.suffix}") as tmp:
                if copy:
                    _copy(container, scan, order, first, stop, str(tmp))
                else:
                    _encode(container, scan, order, first, stop, str(tmp))
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"{src}: cannot cut {start:.3f}-{end:.3f} s ({exc})") from exc
    return ExportedMoment(out, "copy" if copy else "encode", first, stop - first)


def _copyable(scan: _Stream, order: np.ndarray, first: int, stop: int) -> bool:
    """Whether frames first..stop-1 (presentation order) are exactly a run of packets in decode order that
    starts on a keyframe and ends before a keyframe (or the end)."""
    a = int(order[first])
    b = int(order[stop]) if stop < len(order) else len(order)
    if not scan.key[a] or (b < len(order) and not scan.key[b]) or b - a != stop - first:
        return False
    return set(order[first:stop].tolist()) == set(range(a, b))


def _copy(container, scan: _Stream, order: np.ndarray, first: int, stop: int, dst: str) -> None:
    stream = container.streams.video[0]
    lo, hi = int(order[first]), int(order[first]) + (stop - first)
    shift = int(scan.pts[lo])
    with av.open(dst, "w") as output:
        target = output.add_stream_from_template(stream)
        if scan.rotation:
            target.set_display_rotation(scan.rotation)
        container.seek(0, stream=stream)
        n = -1
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            n += 1
            if n < lo:
                continue
            if n >= hi:
                break
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = target
            output.mux(packet)


def _encode(container, scan: _Stream, order: np.ndarray, first: int, stop: int, dst: str) -> None:
    stream = container.streams.video[0]
    kept = scan.pts[order[first:stop]]  # (n,) presentation times, ascending
    starts = scan.pts[scan.key & (scan.pts <= kept[0])]
    seek_to = int(starts.max()) if len(starts) else int(scan.pts.min())
    tb = scan.time_base
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    with av.open(dst, "w") as output:
        target = output.add_stream("libx264", rate=rate, options={"crf": str(CRF), "preset": "veryfast"})
        target.codec_context.time_base = tb
        container.seek(seek_to, stream=stream, backward=True)
        wanted, done = set(kept.tolist()), 0
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts not in wanted:
                if frame.pts is not None and frame.pts > kept[-1]:
                    break
                continue
            if done == 0:
                even = frame.width % 2 == 0 and frame.height % 2 == 0
                target.width, target.height = frame.width, frame.height
                target.pix_fmt = "yuv420p" if even else "yuv444p"
                if frame.rotation or scan.rotation:
                    target.set_display_rotation(float(frame.rotation or scan.rotation))
            out = frame.reformat(format=target.pix_fmt)
            out.pts, out.time_base = frame.pts - int(kept[0]), tb
            output.mux(target.encode(out))
            done += 1
            if done == len(kept):
                break
        output.mux(target.encode(None))
    if done != len(kept):
        raise VideoReadError(f"{dst}: decoded {done} of the {len(kept)} frames of the span")
