"""Index benchmarks: indexing throughput end to end, and search latency / recall of the vector index.

    python benchmarks/index.py                       # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/index.py --skip-default-model  # only the small model for indexing
    python benchmarks/index.py --skip-indexing --sizes 10000   # search part at 10k vectors only
    python benchmarks/index.py --pipeline            # indexer vs model-only throughput, per precision

1. Indexing: a generated folder (`--videos` H.264 files of `--seconds` s at 25 fps, 320x240) is indexed with
   `stanvid.search.index.build_index` from an empty index: probe + decode + preprocess + encode + SQLite + FAISS, all
   timed. Once with a small random model (32 px input, 4 vision layers, 8 frames) and once with the default
   model size (ViT-B/32 + STAN depth 4, 12 frames at 224 px, random weights: speed does not depend on them).
   Decoding alone (the same frames, `read_frames` only) is timed as the ceiling for small models.
2. Search: the text encoder's share of a query, then `--sizes` random unit vectors of dimension 512 (10k, 100k:
   the default switch to the approximate index, 1M), exact (`IndexFlatIP`) and approximate (the IVF that
   `auto` switches to, default nlist / nprobe), one query at a time as the server issues them. Recall@10 of the
   approximate index against the exact one, on two data sets: isotropic Gaussian vectors (the worst case: every
   neighbour is nearly as far as any other) and a clustered mixture (2,000 centres, noise as large as the
   centre vectors), closer to how real embeddings spread.
3. Pipeline (`--pipeline`): on `--pipeline-videos` H.264 files of 20 s at 640x360 (keyframe every 2 s, or the
   folder `--video-dir`), the default model (ViT-B/32 + STAN-4, 12 frames), for each of `--precisions`:
   whole-process `stanvid index` (a subprocess, wall clock, model loading included) against model-only
   `encode_video` throughput at the same precision in this process (the same number of clips, in the batches the
   indexer uses, uint8 -> normalize -> encode -> L2-normalize). Also decoding alone (probe + read_frames +
   resize/crop, one thread), which bounds the ratio on a machine where decoding and the model share the cores:
   `model_core_seconds / (model_core_seconds + decode_core_seconds)`. Then the default (`auto`) index against
   `--precision fp32`: speed ratio and how many of `--top1-queries` text queries get the same top-1 segment.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import stanvid  # noqa: E402
from stanvid import (  # noqa: E402  # noqa: E402
    CLIPConfig,
    ModelConfig,
    STANConfig,
    TextConfig,
    VisionConfig,
    build_index,
    make_vector_index,
    segment_bounds,
    segment_frame_indices,
)
from videogen import iter_frames, write_video  # noqa: E402


# ---------------------------------------------------------------------------------------------- indexing
def make_videos(root: Path, count: int, seconds: float, fps: int = 25) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"clip{i:04d}.mp4"
        write_video(path, iter_frames(int(seconds * fps), 240, 320, seed=i), fps=fps, codec="h264", gop=50)
        paths.append(path)
    return paths


def small_model() -> stanvid.VideoCLIP:
    torch.manual_seed(0)
    cfg = ModelConfig(
        clip=CLIPConfig(
            embed_dim=32,
            vision=VisionConfig(width=64, layers=4, heads=2, patch_size=8, image_size=32),
            text=TextConfig(width=64, layers=2, heads=2, context_length=32),
        ),
        temporal="stan",
        num_frames=8,
        stan=STANConfig(depth=2),
    )
    return stanvid.VideoCLIP(cfg)


def decode_only(paths: list[Path], model_cfg: ModelConfig, segment_seconds: float | None) -> float:
    """Seconds to read the frames the index samples (no model): the decoding ceiling."""
    stanvid.clear_frame_index_cache()
    start = time.perf_counter()
    for path in paths:
        info = stanvid.probe(path)
        idx = [
            segment_frame_indices(a, b, info.fps, info.num_frames, model_cfg.num_frames)
            for a, b in segment_bounds(info.duration, segment_seconds)
        ]
        stanvid.read_frames(
            path, np.concatenate([i for i in idx if i is not None]), size=model_cfg.clip.vision.image_size
        )
    return time.perf_counter() - start


def bench_indexing(args) -> None:

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_videos(tmp / "videos", args.videos, args.seconds)
        print(
            f"generated {len(paths)} videos ({args.seconds:g} s, 320x240, 25 fps, H.264) in "
            f"{time.perf_counter() - t0:.1f} s\n"
        )
        runs = [
            ("small (32 px, 4+2 layers, 8 frames)", small_model(), None),
            ("small (32 px, 4+2 layers, 8 frames)", small_model(), 1.0),
        ]
        if not args.skip_default_model:
            torch.manual_seed(0)
            default = stanvid.create_model("ViT-B/32", temporal="stan", stan_depth=4, num_frames=12)
            runs.append(("default ViT-B/32 + STAN-4, 12 frames, 224 px", default, None))
        print(
            f"{'model':<46} {'segments':>9} {'decode only':>12} {'index':>9} {'videos/s':>9} {'clips/s':>8}"
        )
        for k, (name, model, seg) in enumerate(runs):
            model_dir = tmp / f"model{k}"
            model.save_pretrained(model_dir)
            decode = decode_only(paths, model.config, seg)
            stanvid.clear_frame_index_cache()
            t0 = time.perf_counter()
            report = build_index(
                tmp / "videos",
                tmp / f"idx{k}",
                model_dir,
                segment_seconds=seg,
                batch_size=args.batch_size,
                num_workers=args.workers,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            assert report.indexed == len(paths) and not report.failed
            label = "whole" if seg is None else f"{seg:g} s"
            print(
                f"{name:<46} {label:>9} {decode:>10.2f} s {seconds:>7.2f} s {len(paths) / seconds:>9.2f} "
                f"{report.segments / seconds:>8.1f}",
                flush=True,
            )
        print(
            f"(decode only: probe + read_frames of the sampled frames, one process; index: build_index with "
            f"--workers {args.workers}, --batch-size {args.batch_size}, device cpu, loading the model included)\n"
        )


# ---------------------------------------------------------------------------------------------- pipeline
CAPTIONS = [
    f"a {c} {t} {m}"
    for c in ("red", "green", "blue", "yellow", "dark")
    for t in ("ball", "car", "dog", "person")
    for m in ("moves left", "jumps", "turns around")
]


def model_only(model_dir: Path, precision: str, clips: int) -> tuple[str, float, int]:
    """(resolved precision, videos/s, clips per forward) of the indexer's encode step alone (the same steps as
    `stanvid.search.index.writer._Writer._encode`), on random frames."""
    from stanvid import encode_batch_size, normalize, prepare_for_inference

    model = stanvid.load_model(model_dir).eval()
    cfg = model.config
    runner = prepare_for_inference(model, precision, "cpu")
    per_forward = encode_batch_size(cfg.num_frames * (cfg.clip.vision.num_patches + 1), runner.device, 16)
    size = cfg.clip.vision.image_size
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, 256, (per_forward, cfg.num_frames, 3, size, size), dtype=torch.uint8, generator=g
    )

    def encode(part: torch.Tensor) -> np.ndarray:
        b, t = part.shape[:2]
        video = normalize(part.flatten(0, 1)).view(b, t, *part.shape[2:])
        with runner.autocast():
            emb = runner.model.encode_video(video)
        return torch.nn.functional.normalize(emb.float(), dim=-1).numpy()

    with torch.inference_mode():
        encode(batch[:1])  # warm-up
        start = time.perf_counter()
        done = 0
        while done < clips:
            n = min(per_forward, clips - done)
            encode(batch[:n])
            done += n
        seconds = time.perf_counter() - start
    return runner.precision, clips / seconds, per_forward


def decode_seconds(paths: list[Path], num_frames: int, size: int) -> float:
    """probe + read_frames + resize/crop of every video, one thread: the indexer's decoding work."""
    from stanvid import center_crop, resize_short_side

    stanvid.clear_frame_index_cache()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for path in paths:
            info = stanvid.probe(path)
            idx = segment_frame_indices(0.0, info.duration, info.fps, info.num_frames, num_frames)
            frames = stanvid.read_frames(path, idx, size=size, threads=1)
            center_crop(resize_short_side(frames, size), size)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def index_process(folder: Path, model_dir: Path, out: Path, precision: str, workers: int | None) -> float:
    cmd = [
        sys.executable,
        "-m",
        "stanvid.cli",
        "index",
        str(folder),
        "--model",
        str(model_dir),
        "--out",
        str(out),
    ]
    cmd += ["--precision", precision, "--no-progress", "--device", "cpu"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"stanvid index failed:\n{done.stderr[-3000:]}")
    return seconds


def bench_pipeline(args) -> None:
    from stanvid import open_index

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.video_dir:
            folder = Path(args.video_dir)
            paths = sorted(p for p in folder.iterdir() if p.suffix == ".mp4")
        else:
            folder = tmp / "videos"
            folder.mkdir()
            t0 = time.perf_counter()
            paths = []
            for i in range(args.pipeline_videos):
                path = folder / f"clip{i:04d}.mp4"
                write_video(path, iter_frames(500, 360, 640, seed=i), fps=25, codec="h264", gop=50)
                paths.append(path)
            print(
                f"generated {len(paths)} videos (20 s, 640x360, 25 fps, H.264) in {time.perf_counter() - t0:.0f} s"
            )
        torch.manual_seed(0)
        model = stanvid.create_model("ViT-B/32", temporal="stan", stan_depth=4, num_frames=12)
        model_dir = tmp / "model"
        model.save_pretrained(model_dir)
        cfg = model.config
        decode = decode_seconds(paths, cfg.num_frames, cfg.clip.vision.image_size) / len(paths)
        cores = len(os.sched_getaffinity(0))
        print(
            f"{len(paths)} videos; decoding alone {decode:.3f} s per video on one thread; {cores} cores\n"
            f"{'precision':<10} {'index videos/s':>14} {'model videos/s':>14} {'ratio':>6} {'bound':>6} "
            f"{'batch':>6}"
        )
        seconds = {}
        for requested in args.precisions.split(","):
            whole = index_process(folder, model_dir, tmp / f"idx-{requested}", requested, args.workers)
            seconds[requested] = whole
            resolved, model_speed, per_forward = model_only(model_dir, requested, len(paths))
            model_core_s = cores / model_speed
            bound = model_core_s / (model_core_s + decode)
            index_speed = len(paths) / whole
            print(
                f"{requested + ' (' + resolved + ')':<10} {index_speed:>14.3f} {model_speed:>14.3f} "
                f"{index_speed / model_speed:>6.2f} {bound:>6.2f} {per_forward:>6}",
                flush=True,
            )
        if "auto" in seconds and "fp32" in seconds:
            same = 0
            with (
                open_index(tmp / "idx-auto", precision="auto") as fast,
                open_index(tmp / "idx-fp32", precision="fp32") as ref,
            ):
                for q in CAPTIONS:
                    same += fast.search(q, k=1)[0].relpath == ref.search(q, k=1)[0].relpath
            print(
                f"default (auto) index vs --precision fp32: {seconds['fp32'] / seconds['auto']:.2f}x faster; "
                f"top-1 identical for {same}/{len(CAPTIONS)} queries ({same / len(CAPTIONS):.0%})"
            )
        print(
            "(index: `stanvid index` in a subprocess, wall clock including start-up and model loading; model: "
            "encode_video in batches of the indexer's size; bound: share of the CPU work that is the model's)\n"
        )


# ---------------------------------------------------------------------------------------------- search
def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def dataset(kind: str, n: int, dim: int, queries: int, rng: np.random.Generator):
    if kind == "isotropic":
        return unit(rng.standard_normal((n, dim), dtype=np.float32)), unit(
            rng.standard_normal((queries, dim), dtype=np.float32)
        )
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    data = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # chunks: keeps the temporary noise array small
        m = min(100_000, n - s)
        data[s : s + m] = centres[rng.integers(0, len(centres), m)] + rng.standard_normal(
            (m, dim), dtype=np.float32
        )
    q = centres[rng.integers(0, len(centres), queries)] + rng.standard_normal(
        (queries, dim), dtype=np.float32
    )
    return unit(data), unit(q)


def time_queries(index, queries: np.ndarray, k: int, budget_s: float) -> tuple[np.ndarray, float, float, int]:
    """One query per call; stops early after `budget_s` (at least 5 queries). Returns ids, median and p95 ms."""
    found, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
        if sum(times) > budget_s and len(times) >= 5:
            break
    ms = np.array(times) * 1e3
    return np.stack(found), float(np.median(ms)), float(np.percentile(ms, 95)), len(times)


def bench_text_encoding(queries: int = 30) -> None:
    """The other half of a query's latency: tokenizing and encoding the text with the default text tower."""
    from stanvid import tokenize

    torch.manual_seed(0)
    model = stanvid.create_model("ViT-B/32", temporal="meanP").eval()
    times = []
    with torch.inference_mode():
        for i in range(queries):
            t0 = time.perf_counter()
            model.encode_text(tokenize([f"a person throws a ball to a dog, take {i}"]))
            times.append(time.perf_counter() - t0)
    ms = np.array(times[3:]) * 1e3  # the first calls warm up the allocator
    print(
        f"query text -> embedding (ViT-B/32 text tower, 77 tokens, cpu): median {np.median(ms):.1f} ms, "
        f"p95 {np.percentile(ms, 95):.1f} ms\n"
    )


def bench_search(args) -> None:
    import faiss

    bench_text_encoding()
    dim, k = 512, 10
    print(
        f"search: dim {dim}, k {k}, one query per call, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} "
        "threads"
    )
    print(
        f"{'vectors':>9} {'data':<10} {'index':<28} {'build':>8} {'median':>9} {'p95':>9} {'recall@10':>10}"
    )
    for n in args.sizes:
        for kind in ("isotropic", "clustered"):
            rng = np.random.default_rng(0)
            data, queries = dataset(kind, n, dim, args.queries, rng)
            ids = np.arange(n, dtype=np.int64)
            t0 = time.perf_counter()
            exact = make_vector_index(data, ids, kind="flat")
            build_exact = time.perf_counter() - t0
            truth, med, p95, used = time_queries(exact, queries, k, budget_s=args.flat_budget)
            print(
                f"{n:>9,} {kind:<10} {'exact (flat IP)':<28} {build_exact:>6.1f} s {med:>6.2f} ms {p95:>6.2f} ms "
                f"{'1 (ref)':>10}",
                flush=True,
            )
            t0 = time.perf_counter()
            approx = make_vector_index(data, ids, kind="ivf")
            build_approx = time.perf_counter() - t0
            found, med, p95, _ = time_queries(approx, queries[:used], k, budget_s=1e9)
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found, strict=True)])
            name = f"IVF nlist={approx.nlist} nprobe={approx.nprobe}"
            print(
                f"{n:>9,} {kind:<10} {name:<28} {build_approx:>6.1f} s {med:>6.2f} ms {p95:>6.2f} ms "
                f"{recall:>10.3f}  ({used} queries)",
                flush=True,
            )
            del data, exact, approx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--workers", type=int, default=None, help="decoding workers (default: the indexer's choice)"
    )
    p.add_argument("--pipeline", action="store_true", help="only the indexer-vs-model pipeline benchmark")
    p.add_argument("--pipeline-videos", type=int, default=24)
    p.add_argument(
        "--video-dir", help="use this folder of .mp4 files for --pipeline instead of generating one"
    )
    p.add_argument("--precisions", default="auto,fp32", help="precisions for --pipeline")
    p.add_argument("--skip-default-model", action="store_true")
    p.add_argument("--skip-indexing", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument(
        "--flat-budget", type=float, default=20.0, help="seconds of exact queries per size at most"
    )
    args = p.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)\n"
    )
    if args.pipeline:
        bench_pipeline(args)
        return
    if not args.skip_indexing:
        bench_indexing(args)
    if not args.skip_search:
        bench_search(args)


if __name__ == "__main__":
    main()
