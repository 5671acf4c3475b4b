"""`stanvid prepare-videos SRC DST`: re-encode a folder of videos to small constant-rate files (see stanvid.video.prepare)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prepare-videos",
        help="re-encode a folder of videos to small constant-frame-rate files with dense keyframes",
        description=(
            "Re-encode every video under SRC (mp4 mkv webm mov avi m4v, recursively) into DST with the same "
            "relative paths as .mp4: constant frame rate, shortest side resized, a keyframe every GOP frames. "
            "Finished outputs are skipped, so an interrupted run can be started again; failures are listed "
            "at the end and make the exit code 1."
        ),
    )
    p.add_argument("src", help="folder of source videos (searched recursively)")
    p.add_argument("dst", help="output folder (created; a re-run skips the files already converted)")
    p.add_argument("--fps", type=float, default=3.0, help="output frame rate (default: 3)")
    p.add_argument(
        "--short-side",
        type=int,
        default=224,
        help="output shortest side in pixels, even; 0 keeps the size (default: 224)",
    )
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per CPU)")
    p.add_argument("--codec", default="h264", choices=["h264", "hevc", "vp9", "av1"], help="(default: h264)")
    p.add_argument(
        "--gop", type=int, default=None, help="keyframe interval in frames (default: one per second)"
    )
    p.add_argument("--crf", type=int, default=23, help="quality, lower is better (default: 23)")
    p.add_argument("--preset", default="veryfast", help="x264/x265 speed preset (default: veryfast)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from stanvid.video.prepare import prepare_videos

    report = prepare_videos(
        args.src,
        args.dst,
        fps=args.fps,
        short_side=args.short_side or None,
        workers=args.workers,
        codec=args.codec,
        gop=args.gop,
        crf=args.crf,
        preset=args.preset,
        progress=not args.no_progress,
    )
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
