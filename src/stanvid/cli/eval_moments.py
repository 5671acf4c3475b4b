"""`stanvid eval-moments ANNOTATIONS.jsonl VIDEO_DIR --model M`: moment retrieval scored as QVHighlights scores it."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval-moments",
        help="score moment retrieval on a QVHighlights-format annotation file over your copy of its videos",
        description="Index VIDEO_DIR (each annotation's `vid` is a file <vid>.<ext> there) with --model, cut "
        "each query's moments in its own video and print R1@0.5, R1@0.7, mAP@0.5 and mAP@0.75 as QVHighlights' "
        "standalone evaluator defines them (annotations: JSON lines with qid, query, vid, duration, "
        "relevant_windows).",
    )
    p.add_argument("annotations", help="QVHighlights-format .jsonl")
    p.add_argument("video_dir", help="folder holding the videos the annotations name")
    p.add_argument("--model", required=True, help="any model stanvid.load_model reads")
    p.add_argument(
        "--index", default=None, help="keep the index here (reused on the next run; default: temporary)"
    )
    p.add_argument("--segment-seconds", type=float, default=None, metavar="S", help="as `stanvid index`")
    p.add_argument(
        "--predictions", default=None, metavar="PATH", help="write the predictions (submission format)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.fileio import atomic_write_text
    from stanvid.search.moment_eval import evaluate_moments

    result = evaluate_moments(
        args.annotations,
        args.video_dir,
        args.model,
        index=args.index,
        progress=not args.no_progress,
        segment_seconds=args.segment_seconds,
        device=args.device,
    )
    if args.predictions:
        atomic_write_text(args.predictions, "".join(json.dumps(p) + "\n" for p in result.predictions))
    print(result.summary())
    return 0
