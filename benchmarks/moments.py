"""Moments benchmark: where in a long video is what the query describes, against fixed segments.

    python benchmarks/moments.py --demo /tmp/stanvid-demo            # a demo's output folder (model + data)
    python benchmarks/moments.py --demo DIR --files 4 --per-file 4 --seed 0

Long videos are composed from the demo's test appearance clips (`stanvid demo`, `data/test_appearance.csv`):
each file holds `--per-file` objects, each clip looped forward and back to a random length in
[`--min-seconds`, `--max-seconds`], between empty stretches (frames of one plain background, no object) of
1.5 to 6 s, before the first and after the last too; every object appears in one file only, and its caption
("a red circle") is its query. The folder is indexed with the demo's trained model and `build_index`'s defaults
(one embedding per file plus moment features in 1 s windows; `--windows 2,4` adds indexes with longer ones),
then with fixed segments of 2, 5 and 10 s (`--no-moments`; `--no-segments` skips them), and
each caption's top hit is compared with its true span: R1@IoU0.5, R1@IoU0.7 (the top hit is in the right file
and overlaps its span by that IoU) and mean IoU (0 for a hit in another file). Time per query: `--repeat`
rounds of every caption, `search(..., k=10)` plain and with `moments=True` on the same index, text encoding
included, in alternating rounds. The set is also written in QVHighlights' format (`annotations.jsonl`) and scored with
`stanvid.search.moment_eval.evaluate_moments` (each query's moments cut in its own video), as
`stanvid eval-moments` does.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

import stanvid


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """(F, H, W, 3) uint8 as lossless H.264 (as the demo writes its clips)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def compose(
    demo: Path,
    out: Path,
    files: int,
    per_file: int,
    low: float,
    high: float,
    seed: int,
    gaps: tuple[float, float] = (1.5, 6.0),
) -> list[dict]:
    """Write `files` videos of `per_file` looped test clips each under `out`; returns one row per moment."""
    probe, read_frames = stanvid.probe, stanvid.read_frames
    rng = np.random.default_rng(seed)
    with open(demo / "data" / "test_appearance.csv", newline="") as f:
        clips = list(csv.DictReader(f))
    by_caption = {}
    for row in clips:  # one clip per object: each caption has one right answer
        by_caption.setdefault(row["caption"], row)
    chosen = [by_caption[c] for c in rng.permutation(sorted(by_caption))[: files * per_file]]
    if len(chosen) < files * per_file:
        raise SystemExit(f"{demo}: only {len(chosen)} test objects for {files} x {per_file} moments")
    moments = []
    for n in range(files):
        path = out / f"long-{n:02d}.mp4"
        first = demo / "data" / "videos" / f"{chosen[n * per_file]['video']}.mp4"
        fps = probe(first).fps
        corner = read_frames(first, [0]).numpy()[0, :2, :2].reshape(-1, 3)  # the background of a clip
        empty = np.broadcast_to(np.median(corner, axis=0).astype(np.uint8), read_frames(first, [0]).shape[1:])
        parts, t = [], 0
        for row in chosen[n * per_file : (n + 1) * per_file]:
            gap = int(round(rng.uniform(*gaps) * fps))
            parts.append(np.repeat(empty[None], gap, axis=0))
            t += gap
            src = demo / "data" / "videos" / f"{row['video']}.mp4"
            frames = read_frames(src, np.arange(probe(src).num_frames)).numpy()  # (F, S, S, 3)
            loop = np.concatenate([frames, frames[-2:0:-1]])  # forward and back: no jump at the seam
            count = int(round(rng.uniform(low, high) * fps))
            parts.append(loop[np.arange(count) % len(loop)])
            moments.append(
                {"file": path.name, "query": row["caption"], "start": t / fps, "end": (t + count) / fps}
            )
            t += count
        gap = int(round(rng.uniform(*gaps) * fps))
        parts.append(np.repeat(empty[None], gap, axis=0))
        video = np.concatenate(parts)
        write_video(path, video, fps=int(round(fps)))
        for m in moments:
            if m["file"] == path.name:
                m["duration"] = len(video) / fps
    return moments


def top_hits(index: stanvid.VideoIndex, rows: list[dict], **kw) -> list[tuple[str, float, float] | None]:
    out = []
    for m in rows:
        hits = index.search(m["query"], 1, **kw)
        out.append((hits[0].relpath, hits[0].start, hits[0].end) if hits else None)
    return out


def scores(moments: list[dict], hits: list) -> dict[str, float]:
    ious = [
        stanvid.temporal_iou((h[1], h[2]), (m["start"], m["end"]))
        if h is not None and h[0] == m["file"]
        else 0.0
        for m, h in zip(moments, hits, strict=True)
    ]
    ious = np.array(ious)
    return {
        "R1@0.5": float((ious >= 0.5).mean()),
        "R1@0.7": float((ious >= 0.7).mean()),
        "mIoU": float(ious.mean()),
    }


def query_seconds(index: stanvid.VideoIndex, rows: list[dict], repeat: int) -> tuple[float, float]:
    """Seconds per query, plain and with moments, timed in alternating rounds (a change of the machine's load
    meanwhile falls on both)."""
    for kw in ({}, {"moments": True}):  # warm up
        index.search(rows[0]["query"], 10, **kw)
    spent = [0.0, 0.0]
    for _ in range(repeat):
        for i, kw in enumerate(({}, {"moments": True})):
            t0 = time.perf_counter()
            for m in rows:
                index.search(m["query"], 10, **kw)
            spent[i] += time.perf_counter() - t0
    return spent[0] / (repeat * len(rows)), spent[1] / (repeat * len(rows))


def _index(videos: Path, out: Path, model: Path, **kw) -> tuple[stanvid.VideoIndex, float, int]:
    t0 = time.perf_counter()
    stanvid.build_index(videos, out, model, progress=False, **kw)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return stanvid.open_index(out, follow=None), seconds, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, type=Path, help="a `stanvid demo` output folder (model/, data/)")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--per-file", type=int, default=4)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=5.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5, help="rounds of queries timed")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument(
        "--windows",
        type=lambda v: [float(w) for w in v.split(",") if w],
        default=[],
        metavar="S,S",
        help="also index with moment windows of these many seconds (`moments=S`) and score them",
    )
    p.add_argument("--no-segments", action="store_true", help="skip the fixed-segment indexes")
    p.add_argument(
        "--gaps",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default=(1.5, 6.0),
        metavar="MIN,MAX",
        help="seconds of the empty stretches (default 1.5,6)",
    )
    args = p.parse_args()
    cpu = subprocess.run(
        "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"# {platform.python_version()} stanvid {stanvid.__version__} | {cpu or platform.processor()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        videos = work / "videos"
        videos.mkdir(parents=True, exist_ok=True)
        moments = compose(
            args.demo,
            videos,
            args.files,
            args.per_file,
            args.min_seconds,
            args.max_seconds,
            args.seed,
            args.gaps,
        )
        hours = sum({m["file"]: m["duration"] for m in moments}.values()) / 3600
        lengths = [m["end"] - m["start"] for m in moments]
        print(
            f"{len(moments)} moments of {min(lengths):.1f} to {max(lengths):.1f} s in {args.files} files, "
            f"{hours * 3600:.0f} s of video"
        )
        model = args.demo / "model"
        rows = []
        index, secs, size = _index(videos, work / "moments.idx", model)
        rows.append(("--moments (default index)", scores(moments, top_hits(index, moments, moments=True))))
        rows.append(("default index, plain (one per file)", scores(moments, top_hits(index, moments))))
        plain_q, moment_q = query_seconds(index, moments, args.repeat)
        index.close()
        for window in args.windows:
            ix, _, _ = _index(videos, work / f"moments-{window:g}.idx", model, moments=window)
            rows.append(
                (f"--moments, windows of {window:g} s", scores(moments, top_hits(ix, moments, moments=True)))
            )
            ix.close()
        plain, psecs, psize = _index(videos, work / "plain.idx", model, moments=False)
        plain.close()
        for seg in () if args.no_segments else (2.0, 5.0, 10.0):
            ix, _, _ = _index(videos, work / f"seg{seg:g}.idx", model, segment_seconds=seg, moments=False)
            rows.append((f"fixed segments of {seg:g} s", scores(moments, top_hits(ix, moments))))
            ix.close()
        print("\n| hits | R1@IoU0.5 | R1@IoU0.7 | mean IoU |\n| --- | --- | --- | --- |")
        for name, s in rows:
            print(f"| {name} | {s['R1@0.5']:.2f} | {s['R1@0.7']:.2f} | {s['mIoU']:.2f} |")
        print(
            f"\nper query (k=10, text encoding included): plain {plain_q * 1e3:.2f} ms, --moments "
            f"{moment_q * 1e3:.2f} ms ({moment_q / plain_q:.2f}x)"
        )
        print(
            f"index: {size / 1e6:.2f} MB with moments vs {psize / 1e6:.2f} MB without "
            f"(+{(size - psize) / 1e6 / hours:.1f} MB per hour of video); indexing {secs:.1f} s vs {psecs:.1f} s "
            f"({secs / psecs:.2f}x)"
        )
        ann = work / "annotations.jsonl"
        with open(ann, "w") as f:
            for i, m in enumerate(moments):
                f.write(
                    json.dumps(
                        {
                            "qid": i,
                            "query": m["query"],
                            "vid": Path(m["file"]).stem,
                            "duration": m["duration"],
                            "relevant_windows": [[m["start"], m["end"]]],
                        }
                    )
                    + "\n"
                )
        result = stanvid.evaluate_moments(ann, videos, str(model), index=work / "moments.idx")
        print(f"QVHighlights-style, each query in its own video: {result.summary()}")


if __name__ == "__main__":
    sys.exit(main())
