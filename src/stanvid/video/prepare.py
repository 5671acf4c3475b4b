"""Re-encode a folder of videos into small constant-frame-rate files with dense keyframes.

This is what CLIP4Clip users do with ffmpeg scripts before training (3 fps, shortest side 224): a 30 s clip
becomes 90 small frames that decode in milliseconds, and a keyframe every second makes any sampled frame a
short decode away. `prepare_videos` does it for a whole tree, in parallel processes, and can be stopped and
re-run: every output is written to a temporary file in its final folder and renamed into place when complete
(`stanvid.fileio.atomic_path`), so an output that exists is a finished one and is skipped. A manifest in DST records
the settings, so a re-run with different settings fails instead of mixing two kinds of outputs. A file that
cannot be converted is reported with its error, and the rest go on.

Resampling to a constant rate: output frame k (at k / fps seconds from the first frame) is the input frame shown
at that moment, i.e. the last one that starts at or before it, so variable-rate inputs come out evenly spaced.
The shortest side is scaled to `short_side` (bicubic, in FFmpeg's scaler; the other side keeps the aspect ratio,
rounded to an even number as 4:2:0 video needs). Audio is dropped. A display rotation (a phone's portrait video)
is applied: outputs are upright and carry none, so every reader shows them as the source is shown.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from stanvid.errors import ConfigError, StanvidError, VideoReadError
from stanvid.fileio import atomic_path, atomic_write_text
from stanvid.video.decode import SKIP_NONREF_CODECS, quarter_turns, video_stream
from stanvid.video.folders import walk_videos

MANIFEST = ".stanvid-prepare.json"
_PARTIAL = ".partial.mp4"
# what `run_jobs` records for a job whose worker process was lost
WORKER_DIED = "a worker process died (a crash in the decoder or out of memory); re-run to retry"

# codec name -> (PyAV encoder, options builder(gop, crf, preset))
_ENCODERS: dict[str, tuple[str, Callable[[int, int, str], dict[str, str]]]] = {
    "h264": (
        "libx264",
        lambda gop, crf, preset: {
            "crf": str(crf),
            "preset": preset,
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0",
        },
    ),
    "hevc": (
        "libx265",
        lambda gop, crf, preset: {
            "crf": str(crf),
            "preset": preset,
            "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:log-level=error",
        },
    ),
    "vp9": (
        "libvpx-vp9",
        lambda gop, crf, preset: {
            "crf": str(crf),
            "b": "0",
            "g": str(gop),
            "keyint_min": str(gop),
            "deadline": "good",
            "cpu-used": "4",
            "lag-in-frames": "0",
        },
    ),
    "av1": (
        "libsvtav1",
        lambda gop, crf, preset: {"crf": str(crf), "preset": "8", "g": str(gop), "svtav1-params": "scd=0"},
    ),
}


@dataclass(frozen=True)
class PrepareSettings:
    """How outputs are encoded; stored in DST's manifest so a resumed run encodes the same way."""

    fps: float = 3.0
    short_side: int | None = 224
    codec: str = "h264"
    gop: int | None = None  # keyframe interval in frames; None: one keyframe per second of output
    crf: int = 23
    preset: str = "veryfast"

    def __post_init__(self):
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"fps must be a positive number, got {self.fps!r}")
        if self.short_side is not None and (self.short_side < 2 or self.short_side % 2):
            raise ConfigError(
                f"short_side must be an even number >= 2 (4:2:0 video), got {self.short_side!r}"
            )
        if self.codec not in _ENCODERS:
            raise ConfigError(f"codec must be one of {sorted(_ENCODERS)}, got {self.codec!r}")
        try:
            av.Codec(_ENCODERS[self.codec][0], "w")
        except av.codec.codec.UnknownCodecError:
            raise ConfigError(
                f"codec {self.codec!r}: this PyAV build has no {_ENCODERS[self.codec][0]} encoder"
            ) from None
        if self.gop is not None and self.gop < 1:
            raise ConfigError(f"gop must be >= 1 frames, got {self.gop!r}")

    @property
    def keyframe_interval(self) -> int:
        return self.gop if self.gop is not None else max(1, round(self.fps))


@dataclass
class PrepareReport:
    """Outcome per source file, as paths relative to SRC; `failed` pairs a file with its error message."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"converted {len(self.converted)}, skipped {len(self.skipped)} (already done), failed {len(self.failed)}"
        ]
        lines += [f"  FAILED {name}: {message}" for name, message in self.failed]
        return "\n".join(lines)


def prepare_videos(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fps: float = 3.0,
    short_side: int | None = 224,
    workers: int | None = None,
    codec: str = "h264",
    gop: int | None = None,
    crf: int = 23,
    preset: str = "veryfast",
    progress: bool = True,
) -> PrepareReport:
    """Re-encode every video under `src` into `dst` (same relative paths, `.mp4`), skipping finished outputs.

    `short_side=None` keeps each video's size (rounded down to even numbers). `workers` processes convert
    files in parallel (None: one per CPU; 1: in this process). Returns a report;
    failures are collected, not raised. Raises ConfigError for bad settings, a missing `src`, or a `dst` that
    was prepared with other settings.
    """
    settings = PrepareSettings(fps=fps, short_side=short_side, codec=codec, gop=gop, crf=crf, preset=preset)
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_dir():
        raise ConfigError(f"{src_path}: source folder does not exist")
    if src_path.resolve() == dst_path.resolve():
        raise ConfigError(f"{dst_path}: the output folder must differ from the source folder")
    claim_folder(
        dst_path,
        dst_path / MANIFEST,
        asdict(settings),
        "was prepared",
        "use another output folder, or delete it",
    )

    report = PrepareReport()
    todo: list[tuple[str, Path, Path]] = []
    by_output: dict[Path, str] = {}
    unusable: list[tuple[str, str]] = []  # links out of the folder, undecodable names
    for rel, _ in walk_videos(src_path, exclude=dst_path, skipped=unusable):
        video = src_path / rel
        out = dst_path / Path(rel).with_suffix(".mp4")
        if out in by_output:
            report.failed.append(
                (rel, f"its output {out} is also the output of {by_output[out]}; rename one")
            )
            continue
        by_output[out] = rel
        if out.exists():
            report.skipped.append(rel)
        else:
            todo.append((rel, video, out))

    report.failed += unusable
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    threads = 0 if workers == 1 else 1  # one process per core already: no codec threads on top
    with tqdm(total=len(todo), unit="video", desc="prepare-videos", disable=not progress) as bar:

        def record(rel: str, error: str | None) -> None:
            if error is None:
                report.converted.append(rel)
            else:
                report.failed.append((rel, error))
            bar.set_postfix(failed=len(report.failed), refresh=False)
            bar.update(1)

        run_jobs(
            _convert_reporting,
            [(rel, (video, out, settings, threads)) for rel, video, out in todo],
            workers,
            record,
        )
    report.converted.sort()
    report.failed.sort()
    return report


def run_jobs(
    work: Callable[..., Any], jobs: list[tuple[Any, tuple]], workers: int, record: Callable[[Any, Any], None]
) -> None:
    """``work(*args)`` for each ``(key, args)`` of ``jobs``, calling ``record(key, result)`` as each finishes.

    In this process (in ``jobs`` order) when ``workers`` <= 1 or there is one job, else in up to ``workers``
    spawned processes (as they complete). A job whose worker process died, and every job the broken pool then
    could not run, is recorded with the result `WORKER_DIED`, so the caller reports it and a re-run retries it.
    """
    if workers <= 1 or len(jobs) <= 1:
        for key, args in jobs:
            record(key, work(*args))
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(work, *args): key for key, args in jobs}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                result = WORKER_DIED
            record(futures[future], result)


def claim_folder(folder: Path, manifest: Path, wanted: dict[str, Any], held: str, advice: str) -> None:
    """Create ``folder`` and its ``manifest`` recording ``wanted``, or check that the manifest already there
    records the same, so a re-run with other settings fails instead of mixing two kinds of outputs:
    `ConfigError` "FOLDER {held} with other settings: DIFF; {advice}", or one naming an unreadable manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    if manifest.exists():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{manifest}: unreadable manifest ({exc}); delete it to start over") from None
        if not isinstance(found, dict):
            raise ConfigError(f"{manifest}: unreadable manifest (not a JSON object); delete it to start over")
        if found != wanted:
            diff = ", ".join(
                f"{k}={found.get(k)!r} (now {v!r})" for k, v in wanted.items() if found.get(k) != v
            )
            raise ConfigError(f"{folder} {held} with other settings: {diff}; {advice}")
        return
    atomic_write_text(manifest, json.dumps(wanted, indent=2) + "\n")


def _convert_reporting(video: Path, out: Path, settings: PrepareSettings, threads: int) -> str | None:
    """Convert one file; return None, or the error as one line (run in a worker process)."""
    try:
        convert_video(video, out, settings, threads=threads)
    except Exception as exc:  # reported per file by prepare_videos; the other files go on
        return _describe(exc, video)
    return None


def _describe(exc: Exception, video: Path) -> str:
    """One line for the report, without repeating the file's path (the report names the file)."""
    if isinstance(exc, av.error.FFmpegError):
        return f"FFmpeg: {exc.strerror or exc}"
    text = str(exc)
    if isinstance(exc, StanvidError) and text.startswith(f"{video}: "):
        return text[len(f"{video}: ") :]
    return f"{type(exc).__name__}: {text}"


def convert_video(
    video: str | os.PathLike, out: str | os.PathLike, settings: PrepareSettings, *, threads: int = 0
) -> int:
    """Re-encode one video to `out` (written atomically); returns the number of frames written."""
    video, out = Path(video), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"\.{re.escape(out.stem)}\.\d+\.\d+{re.escape(_PARTIAL)}")
    for name in os.listdir(out.parent):  # partial files of this output left by an interrupted run
        if stale.fullmatch(name):
            (out.parent / name).unlink(missing_ok=True)
    # named so that the clean-up above recognises it when a killed run leaves it behind
    partial = f".{out.stem}.{os.getpid()}.{time.monotonic_ns()}{_PARTIAL}"
    with atomic_path(out, temp_name=partial) as tmp:
        return _encode(video, tmp, settings, threads)


def _encode(video: Path, tmp: Path, settings: PrepareSettings, threads: int) -> int:
    rate = Fraction(settings.fps).limit_denominator(1001)
    keys, counts, by_pts = _plan_slots(video, float(rate))
    # frame key -> number of output slots it fills; frames that fill none are absent
    needed = dict(zip(keys, counts, strict=True))
    encoder, options = _ENCODERS[settings.codec]
    written = 0
    with (
        av.open(str(video), metadata_errors="ignore") as inp,
        av.open(str(tmp), mode="w", format="mp4") as out,
    ):
        stream = video_stream(inp, video)
        cc = stream.codec_context
        cc.thread_type, cc.thread_count = "AUTO", threads
        # frames no slot shows and no other frame references are not decoded at all (see video_io)
        skip_nonref = by_pts and cc.name in SKIP_NONREF_CODECS
        ostream = None
        for index, frame in enumerate(_decode(inp, stream, needed if skip_nonref else None)):
            slots = needed.get(frame.pts if by_pts else index, 0)
            if not slots:
                continue
            if ostream is None:
                turns = quarter_turns(frame)
                shown = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                width, height = _output_size(*shown, settings.short_side)
                opts = options(settings.keyframe_interval, settings.crf, settings.preset)
                ostream = out.add_stream(encoder, rate=rate, options=opts)
                ostream.width, ostream.height, ostream.pix_fmt = width, height, "yuv420p"
                ostream.codec_context.time_base = 1 / rate
                ostream.codec_context.thread_count = threads
            if turns:  # upright before scaling, as ffmpeg's autorotation does
                upright = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), turns))
                frame = av.VideoFrame.from_ndarray(upright, format="rgb24")
            scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            for _ in range(slots):
                scaled.pts = written
                scaled.time_base = 1 / rate
                out.mux(ostream.encode(scaled))
                written += 1
        if written != sum(counts):
            raise VideoReadError(
                f"{video}: decoding gave {written} of the {sum(counts)} output frames planned"
            )
        out.mux(ostream.encode(None))
    return written


def _decode(inp, stream, needed: dict | None):
    """Frames in presentation order; with `needed` (keyed by pts), packets of other frames are decoded only
    when they are reference frames."""
    cc = stream.codec_context
    for packet in inp.demux(stream):
        if packet.size == 0:
            continue
        if needed is not None:
            cc.skip_frame = "DEFAULT" if packet.pts in needed else "NONREF"
        yield from cc.decode(packet)
    cc.skip_frame = "DEFAULT"
    yield from cc.decode(None)


def _plan_slots(video: Path, fps: float) -> tuple[list[int], list[int], bool]:
    """Which input frames fill the output slots, and how many each: from packet timestamps (a demux pass, no
    decoding), or for streams without them (raw H.264/HEVC) from a counting decode at the average rate.

    Returns frame keys (pts, or position in decode output when `by_pts` is False), slot counts, and by_pts.
    """
    with av.open(str(video), metadata_errors="ignore") as inp:
        stream = video_stream(inp, video)
        time_base = stream.time_base
        pts, durations = [], []
        for packet in inp.demux(stream):
            if packet.size and not packet.is_discard:
                pts.append(packet.pts)
                durations.append(packet.duration or 0)
        rate = float(stream.average_rate or stream.base_rate or 0)
    by_pts = bool(pts) and None not in pts and len(set(pts)) == len(pts) and time_base is not None
    if by_pts:
        order = np.argsort(pts, kind="stable")
        keys = [pts[i] for i in order]
        times = np.array(keys, dtype=np.float64) * float(time_base)  # (N,) seconds, ascending
        last = durations[order[-1]] * float(time_base)
    else:
        with av.open(str(video), metadata_errors="ignore") as inp:
            stream = video_stream(inp, video)
            count = sum(1 for _ in inp.decode(stream))
        if not rate:
            raise VideoReadError(f"{video}: frames carry no timestamps and the stream gives no frame rate")
        keys = list(range(count))
        times = np.arange(count) / rate
        last = 0.0
    if not keys:
        raise VideoReadError(f"{video}: the video stream has no frames")
    if last <= 0:  # no duration for the last frame: the typical gap, or one frame at the average rate
        gaps = np.diff(times)
        last = float(np.median(gaps)) if len(gaps) else (1 / rate if rate else 1 / fps)
    counts = _slot_counts(times, times[-1] + last, fps)
    return [k for k, c in zip(keys, counts, strict=True) if c], [int(c) for c in counts if c], by_pts


def _slot_counts(times: np.ndarray, end: float, fps: float) -> np.ndarray:
    """For frames starting at ascending `times` (s), how many output slots each fills at a constant `fps`.

    Slot k, at k / fps after the first frame, shows the last frame starting at or before it; slots run until
    `end`, where the last frame ends (at least one slot).
    """
    eps = 1e-6  # float slack: a frame starting exactly on a slot's time fills it
    rel = times - times[0]
    num_slots = max(1, math.ceil((end - times[0]) * fps - eps))
    chosen = np.searchsorted(rel, np.arange(num_slots) / fps + eps, side="right") - 1  # (S,) frame per slot
    return np.bincount(chosen, minlength=len(times))


def _output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Shortest side to `short_side`, the other scaled with the aspect ratio and rounded to the nearest even."""
    if short_side is None:
        return max(2, width - width % 2), max(2, height - height % 2)
    if width <= height:
        return short_side, max(2, 2 * round(height * short_side / width / 2))
    return max(2, 2 * round(width * short_side / height / 2)), short_side
