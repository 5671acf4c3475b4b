"""Frame-exact, fast video decoding with PyAV.

`read_frames(path, indices)` returns exactly the frames that decoding the whole file and keeping those indices
would return, where frame `i` is the i-th decoded frame in presentation (pts) order. It gets there by decoding
as little as it can:

1. A demux pass (packets only, nothing decoded) builds an index of the file, cached per process: every packet's
   pts, its position in decode order and whether it is a keyframe. From it, each frame gets the keyframe to start
   decoding from: the last keyframe before it in decode order that is not after it in presentation order (with
   open GOPs, the B-frames that follow a keyframe in decode order but show before it refer to the previous GOP,
   so they start one keyframe earlier).
2. The requested frames are grouped into runs: a run starts at a keyframe and ends at the last packet a target
   needs. Runs are read with one seek each; a target whose keyframe is already behind the decoder joins the
   current run instead of seeking, and the decoder is drained at the end of a run, so nothing after the last
   needed packet is decoded.
3. On the way to a target, frames that no other frame references are not decoded at all (FFmpeg's
   `skip_frame = NONREF`, switched per packet: never for a requested frame, and only for codecs whose decoders
   honour the switch per frame: H.264, HEVC, MPEG-4 part 2). With x264's default B-pyramid, half the frames
   between a keyframe and a target are such frames.
4. Only the requested frames are converted to RGB, and `size=` resizes inside the same swscale call (bicubic),
   so no full-size RGB frame is ever made for a resized read.

Decoded frames are matched to targets by their pts, never by counting after a seek; a target that does not come
out of the decoder raises instead of being replaced by a neighbour. Files whose packets lack unique pts (some AVI
files, raw H.264/HEVC streams) are read by decoding from the start and counting frames, which is the
definition itself.

Frames come out as a player shows them: a video whose container carries a display rotation of 90, 180 or 270
degrees (the MP4 display matrix every phone writes for portrait video) is read upright, as ffmpeg does by
default; `VideoInfo` gives the displayed width and height and the rotation. A source is a file, a video in
memory (`MemoryVideo` or bytes: a tar shard's member), a folder of images (`stanvid.video.frames`), or a video
decoded once and held (`stanvid.video.held.DecodedVideo`: served without decoding).
"""

from __future__ import annotations

import functools
import io
import operator
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import get_worker_info

from stanvid.errors import ConfigError, VideoReadError
from stanvid.video import frames as frame_folders
from stanvid.video.held import DecodedVideo

# Decoders that read `skip_frame` for every frame they decode (so it can change between packets) and whose
# NONREF rule only drops frames nothing refers to. Frame-exactness with the switch is checked by the tests;
# `stanvid.video.prepare` skips frames by the same rule.
SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg4"})

# The video files stanvid reads, by extension (lower case), with the media type a browser is sent for each.
# One table for every place that finds videos (datasets, the index, prepare-videos) and for the server, so a
# file one of them accepts is never one another ignores. The order is the order `VideoFinder` tries
# extensions in when an annotation names a video without one.
VIDEO_MEDIA_TYPES: dict[str, str] = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
    ".m4v": "video/mp4",  # MPEG-4 with Apple's extension: browsers play it as video/mp4
    ".flv": "video/x-flv",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".3gp": "video/3gpp",
    ".ogv": "video/ogg",
}
VIDEO_EXTENSIONS: tuple[str, ...] = tuple(VIDEO_MEDIA_TYPES)

_INDEX_CACHE_SIZE = 64  # ~60 bytes per packet: 30 MB at most for 5-minute videos


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` knows about a video's first video stream.

    `num_frames` is exact: frames counted from the packets (or by decoding, for files whose packets carry no
    usable timestamps), not the container's header, which may be missing or wrong. `fps` is `num_frames /
    duration`, the average rate for variable-frame-rate files. `seekable` is False when reads must decode from
    the start; `truncated` is True when the file ends inside the stream (frames before that point are readable).
    `width` and `height` are as displayed: `rotation` (0, 90, 180 or 270, counter-clockwise) is the display
    rotation `read_frames` applies to the stored frames. A frame folder has the codec ``"images"``.
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str
    num_keyframes: int
    seekable: bool
    truncated: bool
    rotation: int = 0


@dataclass(frozen=True, eq=False)
class MemoryVideo:
    """A video held in memory (a tar shard's member), with the ``name`` that messages give it."""

    data: bytes
    name: str = "<video in memory>"

    def __str__(self) -> str:
        return self.name


VideoSource = str | os.PathLike | bytes | MemoryVideo | DecodedVideo


@dataclass(frozen=True)
class _Index:
    """A video stream's packets, from one demux pass. Arrays in decode order are over packets with data."""

    info: VideoInfo
    stream_index: int
    pkt_pts: np.ndarray  # (P,) int64 pts in decode order (unused when not seekable)
    pkt_dts: np.ndarray  # (P,) int64, _NO_TS where the demuxer gave none
    pkt_key: np.ndarray  # (P,) bool
    pts_sorted: np.ndarray  # (P,) int64 packet pts, ascending (for pts -> decode position lookups)
    pts_sorted_pos: np.ndarray  # (P,) int64 decode position of each entry of pts_sorted

    def position_of(self, pts: int | None) -> int | None:
        """Decode position of the packet with this pts, or None when the index has no such packet."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts_sorted, pts))
        if i < len(self.pts_sorted) and self.pts_sorted[i] == pts:
            return int(self.pts_sorted_pos[i])
        return None

    frame_pts: np.ndarray  # (N,) pts of frame i, ascending
    frame_pos: np.ndarray  # (N,) decode position of frame i's packet
    frame_start: np.ndarray  # (N,) decode position to start decoding from to get frame i
    problem: str | None  # why the stream ends early, when it does
    stored: tuple[int, int] = (0, 0)  # (width, height) of the decoded frames, before the display rotation

    @property
    def turns(self) -> int:
        """Counter-clockwise quarter turns from stored to displayed frames."""
        return self.info.rotation // 90


@dataclass
class _Run:
    start: int  # decode position of the keyframe the run seeks to
    end: int  # decode position of the last packet a target of the run needs
    frames: list[int]


class _IndexMismatch(Exception):
    """The demuxer returned packets the index does not know after a seek: read sequentially instead."""


_NO_TS = np.iinfo(np.int64).min


def probe(source: VideoSource, *, frame_rate: float | None = None) -> VideoInfo:
    """Frame count (exact), fps, duration, displayed size, rotation and codec of the first video stream.

    Costs one demux pass (and the decoding of the first frame, which carries the rotation) the first time a
    file is seen in a process; the result is cached, keyed on the file's path, size and modification time.
    A folder of images (`stanvid.video.frames`) is a video at ``frame_rate`` fps (default
    ``FRAME_FOLDER_FPS``, 30); for files the stream's own rate is reported and ``frame_rate`` is not used.
    """
    if isinstance(source, DecodedVideo):  # held frames (F, H, W, 3): nothing to read
        n, height, width = source.frames.shape[:3]
        return VideoInfo(source.name, n, source.fps, n / source.fps, width, height, "decoded", n, True, False)
    if _is_folder(source):
        return _folder_info(os.fspath(source), frame_rate)[0]
    return _get_index(source).info


def read_frames(
    path: VideoSource,
    indices: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    size: int | None = None,
    threads: int = 0,
) -> torch.Tensor:
    """Frames `indices` of `path` as uint8 RGB, (len(indices), H, W, 3).

    Identical to decoding every frame in order and picking `indices` (any order, repeats allowed). `size`
    resizes so the shortest side is `size` (the other side keeps the aspect ratio, rounded to the nearest
    pixel) with bicubic interpolation inside the RGB conversion. `threads` caps the decoding threads: 0 uses
    every usable CPU (separate keyframe segments decode in parallel), except inside a torch DataLoader worker,
    where the workers already share the cores and 0 means 1.
    Frames are upright as displayed: a display rotation of 90, 180 or 270 degrees in the container is applied
    (as ffmpeg does), after resizing; a non-square sample aspect ratio is not. ``path`` may also be a
    `MemoryVideo` (or bytes), a folder of images (frame ``i`` is its ``i``-th image in natural order) or a
    `DecodedVideo` (its held frames, at their own size).
    Raises VideoReadError naming the file for a missing, empty, unreadable or truncated file, or an index
    outside [0, num_frames).
    """
    size = _check_read_args(size, threads)
    if isinstance(path, DecodedVideo):
        return path.select(_as_index_array(indices, probe(path), path.name), size)
    if _is_folder(path):
        return _read_folder(os.fspath(path), indices, size)
    if threads == 0 and get_worker_info() is not None:
        threads = 1
    path = _as_memory(path) or os.fspath(path)
    index = _get_index(path)
    wanted = _as_index_array(indices, index.info, path)  # (K,)
    out_w, out_h = _output_size(index.info.width, index.info.height, size)
    out = np.empty((len(wanted), out_h, out_w, 3), dtype=np.uint8)  # (K, H, W, 3)
    if len(wanted) == 0:
        return torch.from_numpy(out)
    targets = np.unique(wanted)  # (U,) ascending
    if index.info.seekable:
        try:
            frames = _read_by_seeking(path, index, targets, size, threads)
        except _IndexMismatch as exc:
            warnings.warn(f"{path}: {exc}; decoding from the start instead", RuntimeWarning, stacklevel=2)
            frames = _read_sequentially(path, index, targets, size, threads)
    else:
        frames = _read_sequentially(path, index, targets, size, threads)
    for k, i in enumerate(wanted):
        out[k] = np.rot90(frames[int(i)], index.turns)  # stored -> displayed (a view; the copy is here)
    return torch.from_numpy(out)


def clear_frame_index_cache() -> None:
    """Forget every cached index (files are re-demuxed on their next read)."""
    _cached_index.cache_clear()
    frame_folders._cached_files.cache_clear()
    _memory_index[:] = [None, None]


def _check_read_args(size, threads) -> int | None:
    if size is not None and (isinstance(size, bool) or operator.index(size) <= 0):
        raise ConfigError(f"size must be a positive int (shortest side in pixels), got {size!r}")
    if operator.index(threads) < 0:
        raise ConfigError(f"threads must be >= 0 (0: automatic), got {threads!r}")
    return None if size is None else operator.index(size)


# ----------------------------------------------------------------------------------------------- sources


def _is_folder(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.path.isdir(source)


def _as_memory(source) -> MemoryVideo | None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return MemoryVideo(bytes(source))
    return source if isinstance(source, MemoryVideo) else None


def _folder_info(path: str, frame_rate: float | None) -> tuple[VideoInfo, list[Path]]:
    """A frame folder as a video, with its images in frame order (listed once, for the reader too)."""
    fps = frame_folders.FRAME_FOLDER_FPS if frame_rate is None else float(frame_rate)
    if not fps > 0:
        raise ConfigError(f"frame_rate must be a positive number of frames per second, got {frame_rate!r}")
    files = frame_folders.frame_files(path)
    width, height = frame_folders.image_size(files[0])
    n = len(files)
    info = VideoInfo(path, n, fps, n / fps, width, height, "images", n, seekable=True, truncated=False)
    return info, files


def _read_folder(path: str, indices, size: int | None) -> torch.Tensor:
    info, files = _folder_info(path, None)
    wanted = _as_index_array(indices, info, path)  # (K,)
    expect = (info.width, info.height)
    out_w, out_h = _output_size(info.width, info.height, size)
    out = np.empty((len(wanted), out_h, out_w, 3), dtype=np.uint8)  # (K, H, W, 3)
    images = frame_folders.read_images(files, np.unique(wanted), expect, (out_w, out_h))
    for k, i in enumerate(wanted):
        out[k] = images[int(i)]
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------- index

# the index of the last video read from memory, with the object it belongs to (one sample is probed, then read)
_memory_index: list = [None, None]


def _get_index(path: VideoSource) -> _Index:
    memory = _as_memory(path)
    if memory is not None:
        if _memory_index[0] is not memory:
            if not memory.data:
                raise VideoReadError(f"{memory}: empty video (0 bytes)")
            _memory_index[:] = [memory, _build_index(memory)]
        return _memory_index[1]
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoReadError(f"{path}: no such file") from None
    except OSError as exc:
        raise VideoReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
    return _cached_index(os.path.realpath(path), st.st_size, st.st_mtime_ns, path)


@functools.lru_cache(maxsize=_INDEX_CACHE_SIZE)
def _cached_index(real_path: str, size: int, mtime_ns: int, path: str) -> _Index:
    # size and mtime_ns are part of the key: a rewritten file gets a fresh index
    return _build_index(path)


def _open(path: str | MemoryVideo) -> av.container.InputContainer:
    source = io.BytesIO(path.data) if isinstance(path, MemoryVideo) else path
    try:
        return av.open(source, mode="r", metadata_errors="ignore")  # odd tag bytes are no reason to fail
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"{path}: not a readable video ({_reason(exc)})") from None


def video_stream(
    container: av.container.InputContainer, path: str | os.PathLike
) -> av.video.stream.VideoStream:
    """The container's first video stream that is not cover art; `VideoReadError` naming `path` if none."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:  # skip cover art
            return stream
    raise VideoReadError(f"{path}: no video stream (a {container.format.name} file)")


def _build_index(path: str | MemoryVideo) -> _Index:
    rotation = None
    with _open(path) as container:
        stream = video_stream(container, path)
        pts: list[int | None] = []
        dts: list[int | None] = []
        key: list[bool] = []
        shown: list[bool] = []  # the decoder returns a frame for it (edit-list discards it does not)
        cut: list[bool] = []  # the packet ends where the file does: its frame cannot be trusted
        dur: list[int] = []
        problem = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # end-of-stream markers, AVI's empty "repeat" packets: no frame
                    continue
                if rotation is None:  # the first frame carries the stream's display matrix
                    rotation = _rotation(stream.codec_context, packet)
                pts.append(packet.pts)
                dts.append(packet.dts)
                key.append(packet.is_keyframe)
                shown.append(not packet.is_discard)
                cut.append(packet.is_corrupt)
                dur.append(packet.duration or 0)
                if packet.is_corrupt:
                    problem = "the file ends inside a packet (truncated)"
        except av.error.FFmpegError as exc:  # the demuxer stops where a truncated file's data ends
            problem = f"the file ends early ({_reason(exc)})"
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = stream.time_base or Fraction(1, 1)
        rate = stream.average_rate
        stream_index = stream.index

    frame_pkts = np.flatnonzero(np.array(shown, dtype=bool))
    if len(frame_pkts) == 0:
        why = f": {problem}" if problem else ""
        raise VideoReadError(f"{path}: the video stream has no frames{why}")
    # Seeking needs every packet named by a unique pts, and a stream that starts at a keyframe: what a decoder
    # makes of frames before the first keyframe (drop them, or show them damaged) only decoding can tell.
    seekable = None not in pts and len(set(pts)) == len(pts) and key[0]
    pkt_pts = np.array([_NO_TS if p is None else p for p in pts], dtype=np.int64)
    pkt_dts = np.array([_NO_TS if d is None else d for d in dts], dtype=np.int64)
    pkt_key = np.array(key, dtype=bool)
    pkt_cut = np.array(cut, dtype=bool)

    if seekable:
        if pkt_cut.any():
            # A packet cut short by the end of the file decodes to a guess, or to nothing, depending on the
            # codec; either way the numbering of the frames shown after it would depend on that. The frames of
            # a truncated file are those shown before the cut.
            frame_pkts = frame_pkts[pkt_pts[frame_pkts] < pkt_pts[pkt_cut].min()]
            if len(frame_pkts) == 0:
                raise VideoReadError(f"{path}: no complete video frame ({problem})")
        order = np.argsort(pkt_pts[frame_pkts], kind="stable")
        frame_pos = frame_pkts[order]
        frame_pts = pkt_pts[frame_pos]
        frame_start = _start_positions(pkt_pts, pkt_key, frame_pts, frame_pos)
        num_frames = len(frame_pts)
        duration = _duration(frame_pts, np.array(dur, dtype=np.int64)[frame_pos], time_base, rate)
        pts_sorted_pos = np.argsort(pkt_pts, kind="stable")  # every packet has a pts here
        pts_sorted = pkt_pts[pts_sorted_pos]
    else:
        frame_pos = frame_pts = frame_start = np.zeros(0, dtype=np.int64)
        pts_sorted = pts_sorted_pos = np.zeros(0, dtype=np.int64)
        num_frames, (width, height), decode_problem = _count_decoded(path)
        problem = problem or decode_problem
        duration = num_frames / float(rate) if rate else 0.0
        if num_frames == 0:
            raise VideoReadError(f"{path}: no frame could be decoded ({problem or 'no error reported'})")
    if width <= 0 or height <= 0:  # the demuxer could not tell: the first decoded frame can
        width, height = _first_frame_size(path)
    shown_size = (height, width) if rotation in (90, 270) else (width, height)
    fps = num_frames / duration if duration > 0 else float(rate or 0)
    info = VideoInfo(
        str(path),
        num_frames,
        fps,
        duration,
        *shown_size,
        codec,
        int(pkt_key.sum()),
        seekable,
        problem is not None,
        rotation or 0,
    )
    return _Index(
        info=info,
        stream_index=stream_index,
        pkt_pts=pkt_pts,
        pkt_dts=pkt_dts,
        pkt_key=pkt_key,
        pts_sorted=pts_sorted,
        pts_sorted_pos=pts_sorted_pos,
        frame_pts=frame_pts,
        frame_pos=frame_pos,
        frame_start=frame_start,
        problem=problem,
        stored=(width, height),
    )


def _rotation(cc, packet: av.Packet) -> int:
    """The display rotation (0, 90, 180, 270; counter-clockwise) on the frame the stream's first packet decodes
    to: FFmpeg puts the container's display matrix on every frame. Angles that are not a quarter turn (within a
    degree) are not applied, as ffmpeg's autorotation does not transpose them; 0 when that packet does not
    decode (the reads report the problem)."""
    cc.thread_count = 1  # one frame: no thread pool to start
    try:
        frames = cc.decode(packet) + cc.decode(None)
    except av.error.FFmpegError:
        return 0
    return quarter_turns(frames[0]) * 90 if frames else 0


def quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns (0-3) that show a decoded frame as its display matrix says; 0 for an
    angle that is not within a degree of a quarter turn."""
    degrees = float(frame.rotation) % 360
    turns = round(degrees / 90)
    return turns % 4 if abs(degrees - 90 * turns) <= 1 else 0


def _start_positions(
    pkt_pts: np.ndarray, pkt_key: np.ndarray, frame_pts: np.ndarray, frame_pos: np.ndarray
) -> np.ndarray:
    """For each frame, the decode position of the keyframe to start decoding from.

    The last keyframe at or before the frame in decode order, stepping back while that keyframe shows after
    the frame (an open GOP's leading B-frames need the previous GOP). Frames before the first usable keyframe
    start at position 0, the start of the stream, which is what sequential decoding does.
    """
    key_pos = np.flatnonzero(pkt_key)  # (KF,)
    k = np.searchsorted(key_pos, frame_pos, side="right") - 1  # (N,) index into key_pos, -1: none
    key_pts = pkt_pts[key_pos]  # (KF,)
    leading = np.flatnonzero((k >= 0) & (key_pts[np.maximum(k, 0)] > frame_pts))  # the few that step back
    for i in leading:
        while k[i] >= 0 and key_pts[k[i]] > frame_pts[i]:
            k[i] -= 1
    return np.where(k >= 0, key_pos[np.maximum(k, 0)], 0)  # (N,)


def _duration(frame_pts: np.ndarray, frame_dur: np.ndarray, time_base: Fraction, rate) -> float:
    """Seconds from the first frame's start to the last frame's end (its packet duration, or the usual gap)."""
    last = int(frame_dur[-1])
    if last <= 0:
        gaps = np.diff(frame_pts)
        if len(gaps):
            last = int(np.median(gaps))
        elif rate:
            last = round(1 / (float(rate) * time_base))
    return float((int(frame_pts[-1]) + max(last, 0) - int(frame_pts[0])) * time_base)


def _count_decoded(path: str) -> tuple[int, tuple[int, int], str | None]:
    """Frame count, size and any early end, by decoding everything: for files whose packets cannot name their
    frames. Damaged frames at the very end (a truncated last packet) are not counted."""
    count, size, problems = 0, (0, 0), []
    with _open(path) as container:
        stream = video_stream(container, path)
        _configure(stream.codec_context, 0, frame_threads=False)
        for i, frame in enumerate(_decode_all(container, stream, path, problems)):
            if not frame.is_corrupt:
                count = i + 1
            size = (frame.width, frame.height)
    return count, size, problems[0] if problems else None


def _first_frame_size(path: str) -> tuple[int, int]:
    with _open(path) as container:
        stream = video_stream(container, path)
        for frame in _decode_all(container, stream, path, []):
            return frame.width, frame.height
    raise VideoReadError(f"{path}: no frame could be decoded")


# ----------------------------------------------------------------------------------------------- reading


def _as_index_array(indices, info: VideoInfo, path: str) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= info.num_frames)]
    if bad.size:
        extra = " (the file is truncated; only frames before the cut are readable)" if info.truncated else ""
        raise VideoReadError(
            f"{path}: frame index {int(bad[0])} out of range: the video has {info.num_frames} frames, "
            f"valid indices are 0..{info.num_frames - 1}{extra}"
        )
    return arr


def _output_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    if size is None:
        return width, height
    if width <= height:
        return size, max(1, int(height * size / width + 0.5))
    return max(1, int(width * size / height + 0.5)), size


def _to_rgb(frame: av.VideoFrame, size: int | None, expect: tuple[int, int], path: str, i: int) -> np.ndarray:
    w, h = _output_size(frame.width, frame.height, size)
    if (w, h) != expect:
        raise VideoReadError(
            f"{path}: frame {i} is {frame.width}x{frame.height} but the stream is "
            f"{expect[0]}x{expect[1]}; resolution changes inside a video are not supported"
        )
    if size is None:
        return frame.to_ndarray(format="rgb24")  # (H, W, 3)
    return frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()


def _configure(codec_context, threads: int, *, frame_threads: bool = True) -> None:
    """Frame threads give the most speed, but FFmpeg's concealment of a damaged last packet then depends on
    thread timing; files read by counting from the start (raw streams, whose truncation only the decoder can
    see) use slice threads, whose output and error flags are deterministic."""
    codec_context.thread_type = "AUTO" if frame_threads else "SLICE"
    codec_context.thread_count = threads


def _plan(index: _Index, targets: np.ndarray) -> list[_Run]:
    """Group sorted unique frame indices into runs of continuous decoding, each started by one seek."""
    order = np.lexsort((index.frame_pos[targets], index.frame_start[targets]))
    runs: list[_Run] = []
    for t in targets[order]:
        start, pos = int(index.frame_start[t]), int(index.frame_pos[t])
        if runs and start <= runs[-1].end + 1:  # its keyframe is already behind (or next to) the decoder
            runs[-1].end = max(runs[-1].end, pos)
            runs[-1].frames.append(int(t))
        else:
            runs.append(_Run(start=start, end=pos, frames=[int(t)]))
    return runs


def _read_by_seeking(
    path: str, index: _Index, targets: np.ndarray, size: int | None, threads: int
) -> dict[int, np.ndarray]:
    """Decode the planned runs; independent runs go to parallel decoders when there are threads to spare.

    Runs share nothing, so decoders working on different runs in parallel scale with the cores; FFmpeg's
    frame threads inside one short run do not (a run skips the frames that parallelise best, and each run
    fills and drains the frame pipeline again). One run gets one decoder with all the threads.
    """
    runs = _plan(index, targets)
    budget = threads or _usable_cpus()
    workers = min(budget, len(runs))
    if workers <= 1:
        return _decode_runs(path, index, runs, size, threads)
    per_decoder = max(1, budget // workers)
    chunks = _split_runs(runs, workers)
    frames: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(workers) as pool:  # PyAV releases the GIL while demuxing, decoding and scaling
        for part in pool.map(lambda chunk: _decode_runs(path, index, chunk, size, per_decoder), chunks):
            frames.update(part)
    return frames


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _split_runs(runs: list[_Run], parts: int) -> list[list[_Run]]:
    """`parts` consecutive groups of runs with about equal numbers of packets to decode (so each group's
    decoder seeks forward only)."""
    if parts >= len(runs):
        return [[run] for run in runs]
    costs = [run.end - run.start + 1 for run in runs]
    target = sum(costs) / parts
    groups: list[list[_Run]] = []
    current: list[_Run] = []
    load = 0.0
    for i, (run, cost) in enumerate(zip(runs, costs, strict=True)):
        groups_left = parts - len(groups) - 1  # groups still to open after the current one
        must_close = len(runs) - i == groups_left  # every remaining group needs a run
        if current and groups_left > 0 and (must_close or load + cost / 2 > target):
            groups.append(current)
            current, load = [], 0.0
        current.append(run)
        load += cost
    groups.append(current)
    return groups


def _decode_runs(
    path: str, index: _Index, runs: list[_Run], size: int | None, threads: int
) -> dict[int, np.ndarray]:
    """One container and decoder working through `runs` in order: a seek per run, a drain at its end."""
    expect = _output_size(*index.stored, size)
    frames: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.get(index.stream_index)[0]
        cc = stream.codec_context
        _configure(cc, threads)
        skip_nonref = cc.name in SKIP_NONREF_CODECS
        fresh = True  # nothing demuxed yet: the demuxer stands at decode position 0
        for run in runs:
            if fresh and run.start == 0:
                packets = _packets(container, stream, index, path)
            else:
                packets = _seek(container, stream, index, run.start, path)
            fresh = False
            wanted = {int(index.frame_pts[t]): t for t in run.frames}
            skipping = False
            for pos, packet in packets:
                if skip_nonref:
                    # decode every reference frame and every requested frame; drop the rest unseen
                    skip = packet.pts not in wanted
                    if skip != skipping:
                        cc.skip_frame = "NONREF" if skip else "DEFAULT"
                        skipping = skip
                _collect(_decode(cc, packet, path), wanted, frames, size, expect, path)
                if pos >= run.end:
                    break
            if skipping:
                cc.skip_frame = "DEFAULT"
            _collect(_decode(cc, None, path), wanted, frames, size, expect, path)  # drain the decoder
            missing = [t for t in run.frames if t not in frames]
            if missing:
                why = f" ({index.problem})" if index.problem else ""
                raise VideoReadError(
                    f"{path}: frame {missing[0]} could not be decoded{why}; the decoder did not return it"
                )
    return frames


def _collect(decoded, wanted: dict[int, int], frames: dict, size, expect, path: str) -> None:
    for frame in decoded:
        t = wanted.get(frame.pts)
        if t is not None and t not in frames:
            _check_intact(frame, path, t)
            frames[t] = _to_rgb(frame, size, expect, path, t)


def _check_intact(frame: av.VideoFrame, path: str, i: int) -> None:
    if frame.is_corrupt:  # the decoder concealed missing or broken data: these pixels are a guess
        raise VideoReadError(f"{path}: frame {i} is damaged (the decoder reported errors in its data)")


def _decode(cc, packet, path: str) -> list:
    try:
        return cc.decode(packet)
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"{path}: decoding failed ({_reason(exc)})") from None


def _packets(container, stream, index: _Index, path: str) -> Iterator[tuple[int, av.Packet]]:
    """Packets with data from the demuxer's current position, with their decode positions from the index."""
    expected = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            pos = index.position_of(packet.pts)
            if pos is None or (expected is not None and pos != expected):
                raise _IndexMismatch(f"packet with pts {packet.pts} is not where the index expects it")
            expected = pos + 1
            yield pos, packet
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"{path}: reading packets failed ({_reason(exc)})") from None


def _seek(container, stream, index: _Index, start: int, path: str) -> Iterator[tuple[int, av.Packet]]:
    """Position the demuxer at or before decode position `start` and return its packets from there.

    Demuxers index keyframes by pts (Matroska) or dts (MP4), so a seek to the keyframe's pts can land one
    keyframe late when the GOP is shorter than the B-frame delay; the landing packet is checked against the
    index and earlier timestamps are tried until it is not past `start`.
    """
    candidates = [int(index.pkt_pts[start])]
    if index.pkt_dts[start] != _NO_TS:
        candidates.append(int(index.pkt_dts[start]))
    earlier = np.flatnonzero(index.pkt_key[:start])
    if len(earlier):  # the keyframe before: landing there costs one GOP more, but is still exact
        candidates.append(int(index.pkt_pts[earlier[-1]]))
        if index.pkt_dts[earlier[-1]] != _NO_TS:
            candidates.append(int(index.pkt_dts[earlier[-1]]))
    for ts in candidates:
        try:
            container.seek(ts, backward=True, any_frame=False, stream=stream)
        except av.error.FFmpegError:
            continue
        packets = _packets(container, stream, index, path)
        try:
            first = next(packets, None)
        except _IndexMismatch:  # landed on a packet the index does not know: try an earlier timestamp
            continue
        if first is not None and first[0] <= start:
            return _chain(first, packets)
    raise _IndexMismatch(f"seeking to keyframe at packet {start} did not land at or before it")


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _read_sequentially(
    path: str, index: _Index, targets: np.ndarray, size: int | None, threads: int
) -> dict[int, np.ndarray]:
    """Decode from the start, counting frames: the definition of frame `i`, for files the index cannot seek."""
    expect = _output_size(*index.stored, size)
    need = {int(t) for t in targets}
    last = max(need)
    frames: dict[int, np.ndarray] = {}
    decoded, problems = 0, []
    with _open(path) as container:
        stream = container.streams.get(index.stream_index)[0]
        _configure(stream.codec_context, threads, frame_threads=False)
        for i, frame in enumerate(_decode_all(container, stream, path, problems)):
            decoded = i + 1
            if i in need:
                _check_intact(frame, path, i)
                frames[i] = _to_rgb(frame, size, expect, path, i)
            if i >= last:
                break
    missing = sorted(need - frames.keys())
    if missing:
        why = f"; {problems[0]}" if problems else ""
        raise VideoReadError(
            f"{path}: frame {missing[0]} could not be decoded: decoding from the start gave {decoded} frames{why}"
        )
    return frames


def _decode_all(container, stream, path: str, problems: list[str]) -> Iterator[av.VideoFrame]:
    """Every frame in presentation order, as `container.decode` gives them. Where a truncated file's data ends
    (the demuxer fails, or the decoder rejects the packet the cut went through) the reason is appended to
    `problems` and the decoder drained; a decoding error anywhere else raises VideoReadError."""
    cc = stream.codec_context
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            try:
                frames = cc.decode(packet)
            except av.error.FFmpegError as exc:
                if not packet.is_corrupt:
                    raise VideoReadError(f"{path}: decoding failed ({_reason(exc)})") from None
                problems.append(f"the file ends inside a packet ({_reason(exc)})")
                break
            yield from frames
    except av.error.FFmpegError as exc:
        problems.append(f"the file ends early ({_reason(exc)})")
    yield from _decode(cc, None, path)


def _reason(exc: BaseException) -> str:
    """FFmpeg's error text without PyAV's repetition of the file name."""
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return exc.strerror
    return str(exc)
