"""`stanvid prepare-videos SRC DST`: re-encode a folder of videos to small constant-rate files (see stanvid.video.prepare)."""

from __future__ import annotations

import argparse
import sys

from stanvid.cli.common import add_encode_options, encode_settings


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
    add_encode_options(p)
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from stanvid.video.prepare import prepare_videos

    report = prepare_videos(
        args.src,
        args.dst,
        workers=args.workers,
        **encode_settings(args),
        progress=not args.no_progress,
    )
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
