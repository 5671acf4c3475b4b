"""`stanvid shard`: WebDataset shards from any split the recipes read, so MSR-VTT, Kinetics or your own csv can
be trained (and embedded) from shards as WebVid is.

One sample per video, keyed by its position in the split (``000000123``): the video as it is (its file's
bytes, under its extension) or re-encoded as `stanvid prepare-videos` does (``mp4``); a folder of frames is
always encoded (H.264 with every frame at ``frame_rate``, crf 23; with re-encoding, resampled from there).
Beside it ``json`` (``video_id``, the
source path relative to the video folder, and ``captions`` or ``label`` / ``label_name``), and ``txt`` (the
first caption) or ``cls`` (the label index), so the default ``data.caption_key: null`` trains on the first
caption and ``data.caption_key: captions`` on a random one of them per item. Shard ``i`` holds samples
``i * n .. i * n + n - 1`` (``n = samples_per_shard``) as ``PREFIX{i:05d}.tar``; ``PREFIXshards.json`` is
their wids index with the sample counts (`stanvid.data.shards`), written last. Only videos and frame folders
inside the video folder (links resolved) are packed: any other file an annotation names is left out and reported.

Stopping and re-running is safe: each shard is written to a temporary file and renamed into place when
complete, finished shards are skipped, and a manifest records the settings and the split, so a re-run with
others fails instead of mixing two kinds of shards.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from stanvid.data.recognition import RecognitionAnnotations
from stanvid.data.retrieval import RetrievalAnnotations
from stanvid.data.shards import ShardList, write_shard_index
from stanvid.errors import ConfigError, DatasetError
from stanvid.fileio import atomic_path
from stanvid.video.decode import VIDEO_EXTENSIONS, probe, read_frames
from stanvid.video.frames import FRAME_FOLDER_FPS, is_frame_folder
from stanvid.video.prepare import WORKER_DIED, PrepareSettings, claim_folder, convert_video, run_jobs

__all__ = ["ShardReport", "write_shards"]

MANIFEST = ".stanvid-shard.json"


@dataclass
class ShardReport:
    shards: list[Path]
    written: int  # shards written by this run (the rest were already complete)
    samples: int
    index: Path
    left_out: list[str] = field(default_factory=list)  # "source: why" of sources that are not packed

    def summary(self) -> str:
        text = (
            f"{len(self.shards)} shards ({self.written} written now, {len(self.shards) - self.written} already "
            f"complete), {self.samples} samples; index {self.index}"
        )
        if self.left_out:
            shown = "; ".join(self.left_out[:10]) + ("; ..." if len(self.left_out) > 10 else "")
            text += f"\n{len(self.left_out)} source(s) left out: {shown}"
        return text


def _source(path: str | os.PathLike, videos: Path) -> tuple[Path, str]:
    """(the real path, "") of a source that may be packed: inside ``videos`` once every link is resolved, and a
    regular file named as a video or a frame folder; else (path, why not). Anything else an annotation names
    (a key, a certificate, a file beside the folder) never reaches a shard."""
    real = Path(path).resolve()
    if not real.is_relative_to(videos):
        return real, "outside the video folder"
    if real.is_dir():
        return (real, "") if is_frame_folder(real) else (real, "a folder without frames")
    if not real.is_file():
        return real, "not a regular file"
    if not Path(path).name.lower().endswith(VIDEO_EXTENSIONS):
        return real, f"not a video (extension {Path(path).suffix or 'none'})"
    return real, ""


def _samples(
    ann: RetrievalAnnotations | RecognitionAnnotations, videos: Path, left_out: list[str]
) -> list[dict[str, Any]]:
    """What each sample carries besides the video: picklable, for the worker processes. Sources that may not
    be packed (`_source`) are appended to ``left_out`` as "path: why"."""
    texts = ann.video_to_texts() if isinstance(ann, RetrievalAnnotations) else None
    videos = videos.resolve()
    out = []
    for i, (video_id, path) in enumerate(zip(ann.video_ids, ann.video_paths, strict=True)):
        real, why = _source(path, videos)
        if why:
            left_out.append(f"{path}: {why}")
            continue
        meta: dict[str, Any] = {"video_id": video_id, "source": real.relative_to(videos).as_posix()}
        if texts is not None:
            meta["captions"] = [ann.captions[t] for t in texts[i]]
            if not meta["captions"]:
                continue  # a video without captions is no retrieval sample
        else:
            label = int(ann.labels[i])
            meta["label"] = label
            if ann.classes:
                meta["label_name"] = ann.classes[label]
        ext = Path(path).suffix.lower().lstrip(".") or "mp4"  # the name's: a link's target may have none
        out.append({"key": f"{i:09d}", "path": str(real), "ext": ext, "meta": meta})
    return out


def _encode_folder(folder: str, out: Path, settings: PrepareSettings, fps: float) -> None:
    """A frame folder as an H.264 mp4 at ``fps``, shortest side ``settings.short_side`` (None: as is)."""
    info = probe(folder, frame_rate=fps)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(out), mode="w", format="mp4") as container:
        stream = None
        for start in range(0, info.num_frames, 32):
            idx = list(range(start, min(start + 32, info.num_frames)))
            for i, rgb in zip(idx, read_frames(folder, idx, size=settings.short_side).numpy(), strict=True):
                if stream is None:
                    stream = container.add_stream("libx264", rate=rate, options={"crf": str(settings.crf)})
                    stream.width, stream.height = (
                        rgb.shape[1] - rgb.shape[1] % 2,
                        rgb.shape[0] - rgb.shape[0] % 2,
                    )
                    stream.pix_fmt, stream.codec_context.time_base = "yuv420p", 1 / rate
                frame = av.VideoFrame.from_ndarray(
                    rgb[: stream.height, : stream.width].copy(), format="rgb24"
                )
                frame.pts, frame.time_base = i, 1 / rate
                container.mux(stream.encode(frame.reformat(format="yuv420p")))
        container.mux(stream.encode(None))


def _video_member(sample: dict[str, Any], settings: PrepareSettings | None, fps: float) -> tuple[str, bytes]:
    path = Path(sample["path"])
    if not path.is_dir() and settings is None:
        return sample["ext"], path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "video.mp4"
        if path.is_dir() and settings is None:  # every frame, at the folder's rate
            _encode_folder(str(path), out, PrepareSettings(short_side=None), fps)
        elif path.is_dir():  # every frame near-losslessly, then resampled as any video is
            frames = Path(tmp) / "frames.mp4"
            _encode_folder(str(path), frames, PrepareSettings(short_side=None, crf=0), fps)
            convert_video(frames, out, settings, threads=1)
        else:
            convert_video(path, out, settings, threads=1)
        return "mp4", out.read_bytes()


def _write_shard(
    target: Path, samples: list[dict[str, Any]], settings: PrepareSettings | None, fps: float
) -> str:
    """One complete shard, atomically; returns "" or the first sample's error (nothing is written then)."""
    from webdataset import TarWriter

    with atomic_path(target, temp_name=f".{target.name}.{os.getpid()}.partial") as tmp, open(tmp, "wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT)
        for sample in samples:
            try:
                ext, data = _video_member(sample, settings, fps)
            except Exception as exc:  # reported with the sample; the shard is not written
                return f"{sample['path']}: {exc}"
            meta = sample["meta"]
            member = {"__key__": sample["key"], ext: data, "json": json.dumps(meta).encode()}
            if "captions" in meta:
                member["txt"] = meta["captions"][0].encode()
            else:
                member["cls"] = str(meta["label"]).encode()
            writer.write(member)
        writer.close()
    return ""


def write_shards(
    annotations: RetrievalAnnotations | RecognitionAnnotations,
    video_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "",
    reencode: PrepareSettings | None = None,
    frame_rate: float = FRAME_FOLDER_FPS,
    workers: int = 1,
    source: str = "",
) -> ShardReport:
    """Write the split's samples as shards into ``out`` (see the module docstring); returns what was written.

    ``reencode``: `PrepareSettings` to re-encode every video with (None: the files' bytes as they are).
    ``workers`` processes write shards in parallel. A video that cannot be read or re-encoded stops its shard
    (`DatasetError` naming it, after the other shards are done): fix or drop it and re-run."""
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if "/" in prefix or prefix.startswith("."):
        raise ConfigError(f"prefix {prefix!r} must be a file name prefix (no '/', no leading '.')")
    out = Path(out)
    left_out: list[str] = []
    samples = _samples(annotations, Path(video_dir), left_out)
    if not samples:
        why = f" ({len(left_out)} left out, the first {left_out[0]})" if left_out else ""
        raise DatasetError(f"{annotations.name}: no samples to write{why}")
    wanted = {
        "prefix": prefix,
        "source": source or annotations.name,
        "samples": len(samples),
        "samples_per_shard": samples_per_shard,
        "reencode": asdict(reencode) if reencode is not None else None,
        "frame_rate": frame_rate,
    }
    claim_folder(out, out / (prefix + MANIFEST), wanted, "holds shards written", "use another folder")
    chunks = [samples[i : i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    paths = [out / f"{prefix}{i:05d}.tar" for i in range(len(chunks))]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    errors = _run(todo, paths, chunks, reencode, frame_rate, workers)
    if errors:
        raise DatasetError(f"{len(errors)} shard(s) not written; the first problem: {errors[0]}")
    shards = ShardList(tuple(map(str, paths)), tuple(len(c) for c in chunks))
    index = out / f"{prefix}shards.json"
    write_shard_index(index, shards)
    return ShardReport(paths, len(todo), len(samples), index, left_out)


def _run(todo, paths, chunks, reencode, frame_rate, workers) -> list[str]:
    """Write shards ``todo``; returns their errors (a lost worker's names its shard)."""
    errors = []

    def record(i: int, error: str) -> None:
        if error:
            errors.append(f"{paths[i]}: {error}" if error == WORKER_DIED else error)

    run_jobs(_write_shard, [(i, (paths[i], chunks[i], reencode, frame_rate)) for i in todo], workers, record)
    return errors
