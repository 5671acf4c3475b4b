"""Videos per second of the retrieval data loader (decode + sample + CLIP preprocessing + tokenize).

Generates a folder of short H.264 videos (MSR-VTT-like: 320x240, 25 fps, a few seconds, keyframe every 250
frames as ffmpeg's default, B-frames), writes a caption csv, and times full passes of
``RetrievalDataset`` (12 uniformly sampled frames, shortest side 224 in the decoder, centre crop,
normalize, 32 token ids) through ``make_loader`` with 0, 1 and 2 workers. The first pass over the folder
pays for the per-file index (one demux pass per file, cached per process); with persistent workers each
worker builds its own cache, so the table reports the first pass and the best of the following ones.

    python benchmarks/loader.py [--videos 40] [--seconds 3] [--frames 12] [--size 224] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stanvid import RetrievalDataset, load_video_captions, make_loader  # noqa: E402
from videogen import iter_frames, write_video  # noqa: E402


def make_folder(root: Path, videos: int, seconds: float, width: int, height: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    frames = int(round(seconds * 25))
    rows = []
    for i in range(videos):
        path = root / f"video{i}.mp4"
        if not path.exists():
            write_video(path, iter_frames(frames, height, width, seed=i), fps=25, gop=250, bframes=3)
        rows.append([path.name, f"a generated clip number {i} with some drifting texture"])
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    return root / "captions.csv"


def time_passes(dataset, workers: int, batch_size: int, passes: int) -> list[float]:
    loader = make_loader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available()
    )
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        count = 0
        for batch in loader:
            count += batch["video"].shape[0]
        times.append(time.perf_counter() - start)
        assert count == len(dataset), (count, len(dataset))
    if loader.skipped:
        print(loader.skip_summary())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="reuse/keep the generated videos here")
    parser.add_argument(
        "--model",
        default="ViT-B/32",
        help="architecture whose inference speed the loader must match "
        "(randomly initialised STAN, depth 4); 'none' skips it",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one decode/transform thread per process, like a loader worker
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "videos"
        start = time.perf_counter()
        captions = make_folder(folder, args.videos, args.seconds, args.width, args.height)
        print(
            f"generated {args.videos} videos of {args.seconds:g} s, {args.width}x{args.height}, "
            f"in {time.perf_counter() - start:.1f} s ({folder})"
        )
        ann = load_video_captions(captions, folder)
        dataset = RetrievalDataset(ann, num_frames=args.frames, image_size=args.size, context_length=32)
        print(f"cpu cores: {os.cpu_count()}; batch {args.batch_size}; {args.frames} frames at {args.size}px")
        print(f"{'workers':>7}  {'first pass':>12}  {'best later pass':>16}")
        for workers in args.workers:
            times = time_passes(dataset, workers, args.batch_size, args.passes)
            first = len(dataset) / times[0]
            later = len(dataset) / min(times[1:]) if len(times) > 1 else float("nan")
            print(f"{workers:>7}  {first:>8.1f} v/s  {later:>12.1f} v/s")
        if args.model != "none":
            print(
                f"model inference ({args.model} STAN, {args.device}): {model_videos_per_s(args):.2f} v/s "
                f"(batch {args.batch_size}); the loader keeps up when its v/s is at least this"
            )


def model_videos_per_s(args) -> float:
    """Inference videos/s of the model the loader feeds, on the same frames/size, best of 3 batches."""
    import stanvid

    torch.set_num_threads(os.cpu_count() or 1)
    model = stanvid.create_model(args.model, temporal="stan", stan_depth=4, num_frames=args.frames).to(
        args.device
    )
    model.eval()
    size = model.config.clip.vision.image_size
    video = torch.randn(args.batch_size, args.frames, 3, size, size, device=args.device)
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
