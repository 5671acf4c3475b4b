"""Videos per second of the retrieval data loader (decode + sample + CLIP preprocessing + tokenize), by storage:
loose mp4 files, `prepare-videos` output, WebDataset shards, frame folders.

Generates a folder of short H.264 videos (MSR-VTT-like: 320x240, 25 fps, a few seconds, keyframe every 250
frames as ffmpeg's default, B-frames) with a caption csv, and from it the three other layouts of the same videos:
``prepare-videos`` (3 fps, shortest side 224, a keyframe per second), shards written by ``stanvid shard``
(the mp4 bytes as they are, ``--samples-per-shard`` per tar) and frame folders (every frame as a JPEG,
quality 95, mmaction2's ``img_00001.jpg`` names). Each is read at the recipes' frame counts (8: the WebVid
pretraining recipe; 12: MSR-VTT and LSMDC) in evaluation mode (uniform frames, shortest side 224 in the
decoder, centre crop, normalize, 32 token ids), through ``make_loader`` (files, folders) or ``ShardLoader``
(shards), with 0 and 2 worker processes. Each cell is the best of ``--passes`` full passes, every pass cold
(fresh workers, the per-process frame index cleared: each file is demuxed again, as in an epoch over more
videos than the index cache holds).

    python benchmarks/loader.py [--videos 40] [--seconds 3] [--frames 8 12] [--workers 0 2] [--passes 2]

``--start-methods forkserver spawn fork`` repeats the table once per way of starting the worker processes
(stanvid uses forkserver: a forked worker deadlocks with PyAV 18.1.1, docs/data.md), so the cost of the start
method is measured in one run; each pass starts fresh workers, so start-up is inside every figure.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stanvid import (  # noqa: E402
    EvalTransform,
    RetrievalDataset,
    SampleFields,
    SampleReader,
    ShardDataset,
    ShardLoader,
    clear_frame_index_cache,
    load_shards,
    load_video_captions,
    make_loader,
    prepare_videos,
    probe,
    read_frames,
    worker_context,
    write_shards,
)
from videogen import iter_frames, write_video  # noqa: E402

LAYOUTS = ("mp4 files", "prepare-videos", "shards", "frame folders")


def make_folder(root: Path, videos: int, seconds: float, width: int, height: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    frames = int(round(seconds * 25))
    rows = []
    for i in range(videos):
        path = root / f"video{i}.mp4"
        if not path.exists():
            write_video(path, iter_frames(frames, height, width, seed=i), fps=25, gop=250, bframes=3)
        rows.append([path.name, f"a generated clip number {i} with some drifting texture"])
    return write_captions(root / "captions.csv", rows)


def write_captions(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    return path


def make_frame_folders(videos: Path, out: Path) -> Path:
    """Every frame of every video as JPEGs in a folder named after it; a csv naming the folders."""
    rows = []
    for path in sorted(videos.glob("*.mp4")):
        folder = out / path.stem
        if not folder.is_dir():
            folder.mkdir(parents=True)
            frames = read_frames(path, np.arange(probe(path).num_frames)).numpy()
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(folder / f"img_{i + 1:05d}.jpg", quality=95)
        rows.append([path.stem, f"a generated clip named {path.stem}"])
    return write_captions(out / "captions.csv", rows)


def layouts(root: Path, args) -> dict[str, tuple[Path, Path]]:
    """(captions csv, video folder) per layout, or (shard index, folder) for shards; built once, timed."""
    start = time.perf_counter()
    files = make_folder(root / "videos", args.videos, args.seconds, args.width, args.height)
    prepared = root / "prepared"
    report = prepare_videos(root / "videos", prepared, fps=3, short_side=224, workers=1, progress=False)
    assert report.ok, report.summary()
    ann = load_video_captions(files, root / "videos")
    if not (root / "shards" / "shards.json").exists():
        write_shards(ann, root / "videos", root / "shards", samples_per_shard=args.samples_per_shard)
    frames = make_frame_folders(root / "videos", root / "frames")
    print(f"made the 4 layouts of {args.videos} videos in {time.perf_counter() - start:.1f} s ({root})")
    return {
        "mp4 files": (files, root / "videos"),
        "prepare-videos": (files, prepared),
        "shards": (root / "shards" / "shards.json", root / "shards"),
        "frame folders": (frames, root / "frames"),
    }


def videos_per_s(layout: str, source: tuple[Path, Path], frames: int, workers: int, args) -> float:
    """Best of the passes, in videos per second."""
    transform = EvalTransform(args.size)
    if layout == "shards":
        shards = load_shards(str(source[0]))
        reader = SampleReader(
            SampleFields("retrieval"), transform, num_frames=frames, train=False, context_length=32
        )
        loader = ShardLoader(ShardDataset(shards, reader, buffer=1), args.batch_size, num_workers=workers)
        total = loader.batches_per_epoch * args.batch_size
    else:
        ann = load_video_captions(source[0], source[1])
        dataset = RetrievalDataset(ann, num_frames=frames, transform=transform, context_length=32)
        loader = make_loader(
            dataset,
            batch_size=args.batch_size,
            num_workers=workers,
            pin_memory=False,
            persistent_workers=False,
        )
        total = len(dataset)
    best = float("inf")
    for _ in range(args.passes):
        if layout == "shards":
            loader.set_position(0, 0)
        clear_frame_index_cache()  # every pass cold, as an epoch over more videos than the cache holds
        start = time.perf_counter()
        count = sum(batch["video"].shape[0] for batch in loader)
        best = min(best, time.perf_counter() - start)
        assert count == total, (layout, count, total)
    return total / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 12])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument(
        "--start-methods",
        nargs="+",
        default=[None],
        choices=["forkserver", "spawn", "fork"],
        help="how worker processes start (STANVID_WORKER_START); default: the library's choice",
    )
    parser.add_argument("--folder", type=Path, default=None, help="reuse/keep the generated layouts here")
    parser.add_argument(
        "--model",
        default="ViT-B/32",
        help="architecture whose inference speed the loader must match "
        "(randomly initialised STAN, depth 4, at the largest --frames); 'none' skips it",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one decode/transform thread per process, like a loader worker
    with tempfile.TemporaryDirectory() as tmp:
        sources = layouts(args.folder or Path(tmp), args)
        print(
            f"cpu cores: {os.cpu_count()}; batch {args.batch_size}; shortest side {args.size}; best of {args.passes}"
        )
        for method in args.start_methods:
            if method is not None:
                os.environ["STANVID_WORKER_START"] = method
            print(f"workers started by {worker_context().get_start_method()}")
            if method is not None:
                print(
                    f"first batch from 2 fresh workers: {first_batch_seconds(sources['mp4 files'], args):.2f} s"
                )
            table(sources, args)
        print(f"(ratios: to {args.layouts[0]} in the same column)")
        if args.model != "none":
            frames = max(args.frames)
            print(
                f"model inference ({args.model} STAN, {frames} frames, {args.device}): "
                f"{model_videos_per_s(args, frames):.2f} v/s (batch {args.batch_size}); the loader keeps up when "
                "its v/s is at least this"
            )


def first_batch_seconds(source: tuple[Path, Path], args) -> float:
    """Seconds from a new loader's first `next` to its first batch (2 workers): the start-up a start method
    costs, paid once per epoch unless workers persist. Best of `--passes`."""
    ann = load_video_captions(source[0], source[1])
    dataset = RetrievalDataset(ann, num_frames=min(args.frames), transform=EvalTransform(args.size))
    best = float("inf")
    for _ in range(args.passes):
        loader = make_loader(dataset, batch_size=1, num_workers=2, pin_memory=False, persistent_workers=False)
        start = time.perf_counter()
        next(iter(loader))
        best = min(best, time.perf_counter() - start)
    return best


def table(sources: dict[str, tuple[Path, Path]], args) -> None:
    header = "".join(f"  {f:>2} frames, {w} workers" for f in args.frames for w in args.workers)
    print(f"{'layout':<15}{header}")
    base: dict[tuple[int, int], float] = {}
    for layout in args.layouts:
        cells = []
        for f in args.frames:
            for w in args.workers:
                rate = videos_per_s(layout, sources[layout], f, w, args)
                base.setdefault((f, w), rate)
                cells.append(f"{rate:>8.1f} v/s ({rate / base[(f, w)]:.2f}x)")
        print(f"{layout:<15}" + "".join(f"  {c:>21}" for c in cells))


def model_videos_per_s(args, frames: int) -> float:
    """Inference videos/s of the model the loader feeds, on the same frames/size, best of 3 batches."""
    import stanvid

    torch.set_num_threads(os.cpu_count() or 1)
    model = stanvid.create_model(args.model, temporal="stan", stan_depth=4, num_frames=frames).to(args.device)
    model.eval()
    size = model.config.clip.vision.image_size
    video = torch.randn(args.batch_size, frames, 3, size, size, device=args.device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(4):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.encode_video(video)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return args.batch_size / best


if __name__ == "__main__":
    main()
