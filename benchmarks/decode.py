"""Decode speed: 12 uniformly sampled frames per video, `read_frames` against decoding everything and decord.

    python benchmarks/decode.py --workdir /tmp/stanvid-bench --durations 10 60 300

Videos are generated once into --workdir (720p H.264, 25 fps, a keyframe every 250 frames, 3 B-frames with
x264's B-pyramid, crf 23, preset veryfast: what a downloaded 720p video looks like to a decoder) and reused by
later runs; the 300 s one takes a few minutes to encode. For each video and method the script prints the best
and the median wall time of --repeats calls, the median process CPU time (the work done, however it was spread
over threads), videos/s and the speed-ups of `read_frames` over the others, from the best times: on a shared
machine the median mostly measures the other load. The frames are the test-mode uniform sample of
`stanvid.uniform_indices` (the official STAN sampler), and `read_frames` is checked to return exactly the
frames that decoding everything returns.

Methods:
  read_frames (cold)   `stanvid.read_frames` with its per-process index cache cleared first: includes the
                       demux pass that builds the keyframe index, as the first read of a file in a worker does
  read_frames (cached) the index already cached (every later read of the file in the same process)
  read_frames size=224 shortest side resized to 224 inside the RGB conversion (what CLIP's input needs)
  decode-all           PyAV decoding every frame in order (frame threads), converting the 12 kept to RGB
  decord               decord.VideoReader(path).get_batch(indices), when decord is importable
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

import stanvid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import videogen  # noqa: E402  (the test suite's video generator)

FPS = 25
GOP = 250
WIDTH, HEIGHT = 1280, 720


def make_video(workdir: Path, seconds: int) -> Path:
    """The benchmark video of `seconds`, encoded on first use and written atomically (a rerun reuses it)."""
    path = workdir / f"h264_720p_{seconds}s_gop{GOP}.mp4"
    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    print(f"encoding {path.name} ({seconds * FPS} frames, once) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    videogen.write_video(
        tmp,
        videogen.iter_frames(seconds * FPS, HEIGHT, WIDTH, seed=seconds),
        fps=FPS,
        codec="h264",
        gop=GOP,
        bframes=3,
        quality=23,
        preset="veryfast",
    )
    os.replace(tmp, path)
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return path


def decode_all(path: Path, indices: np.ndarray) -> np.ndarray:
    """Decode every frame in order and keep `indices`: the baseline and the definition of frame i."""
    want = {int(i) for i in indices}
    kept: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                kept[i] = frame.to_ndarray(format="rgb24")
    return np.stack([kept[int(i)] for i in indices])


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """Best and median wall seconds and median process CPU seconds over `repeats` calls.

    The best call is the figure for an idle machine (nothing else competing for the cores); the median shows
    what other load did to it; CPU seconds count the work however it was spread over threads.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), statistics.median(walls), statistics.median(cpus)


def bench_video(path: Path, indices: np.ndarray, args, decord) -> tuple[dict[str, tuple], str]:
    """Check read_frames against sequential decoding, then time every method on one video."""
    reference = decode_all(path, indices)
    got = stanvid.read_frames(path, indices).numpy()
    if not np.array_equal(got, reference):
        raise SystemExit(f"{path}: read_frames differs from sequential decoding")

    def cold():
        stanvid.clear_frame_index_cache()
        stanvid.read_frames(path, indices)

    results = {
        "read_frames (cold)": timed(cold, args.repeats),
        "read_frames (cached)": timed(lambda: stanvid.read_frames(path, indices), args.repeats),
        "read_frames size=224": timed(lambda: stanvid.read_frames(path, indices, size=224), args.repeats),
        "decode-all (PyAV)": timed(lambda: decode_all(path, indices), args.decode_all_repeats),
    }
    note = ""
    if decord is not None:

        def with_decord():
            return decord.VideoReader(str(path)).get_batch(list(indices)).asnumpy()

        diff = np.abs(with_decord().astype(np.int16) - reference.astype(np.int16)).max()
        note = f"decord's frames vs sequential decoding: max |difference| {diff}"
        results["decord"] = timed(with_decord, args.repeats)
    return results, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="where generated videos are cached")
    parser.add_argument("--durations", type=int, nargs="+", default=[10, 60, 300], help="video lengths (s)")
    parser.add_argument("--frames", type=int, default=12, help="frames sampled per video")
    parser.add_argument("--repeats", type=int, default=5, help="calls per method")
    parser.add_argument("--decode-all-repeats", type=int, default=2, help="calls of the slow baseline")
    parser.add_argument("--no-decord", action="store_true", help="skip decord even when importable")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    try:
        import decord
    except ImportError:
        decord = None
    if args.no_decord:
        decord = None

    decord_text = decord.__version__ if decord else "absent"
    print(f"PyAV {av.__version__}, {os.cpu_count()} CPUs, decord {decord_text}")
    rows = []
    for seconds in args.durations:
        path = make_video(args.workdir, seconds)
        stanvid.clear_frame_index_cache()
        info = stanvid.probe(path)
        indices = np.asarray(stanvid.uniform_indices(info.num_frames, args.frames), dtype=np.int64)
        results, note = bench_video(path, indices, args, decord)
        rows.append((seconds, info, results, note))

    for seconds, info, results, note in rows:
        print(
            f"\n{seconds} s video: {info.num_frames} frames {info.width}x{info.height} {info.codec}, "
            f"{info.num_keyframes} keyframes; {args.frames} frames per read; read_frames == sequential decode: yes"
        )
        cold_best, _, cold_cpu = results["read_frames (cold)"]
        print(
            f"{'method':22s} {'best s':>7s} {'median s':>8s} {'CPU s':>6s} {'videos/s':>8s}  read_frames (cold) is"
        )
        for name, (best, median, cpu) in results.items():
            ratio = (
                ""
                if name.startswith("read_frames")
                else f"{best / cold_best:.2f}x faster (CPU {cpu / cold_cpu:.2f}x)"
            )
            print(f"{name:22s} {best:7.3f} {median:8.3f} {cpu:6.3f} {1 / best:8.2f}  {ratio}")
        if note:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
