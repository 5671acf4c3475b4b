"""`stanvid classify VIDEO_OR_DIR --model M --labels kinetics400|ssv2|FILE [--top 5] [--out preds.csv|.json]`."""

from __future__ import annotations

import sys

from stanvid.cli.common import add_runtime_argument
from stanvid.cli.precision import add_precision_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "classify",
        help="zero-shot classify a video or a folder of videos against class names",
        description="Score each video against the class names (each name in every prompt template, "
        "encoded by the text tower and averaged) and print or write its top classes.",
    )
    p.add_argument("videos", help="a video file or a folder of videos (searched recursively)")
    p.add_argument("--model", required=True, help="any model stanvid.load_model reads")
    p.add_argument(
        "--labels",
        default="kinetics400",
        help="kinetics400 or ssv2 (shipped), or a file of class names: .txt one per line, .csv id,name, "
        ".json (default kinetics400)",
    )
    p.add_argument("--top", type=int, default=5, help="classes reported per video (default 5)")
    p.add_argument(
        "--templates",
        default="default",
        help="prompt templates: 'default' (stanvid.search.classify.TEMPLATES), 'none' (the names as they are), or "
        "a text file with one template per line, '{}' standing for the class name",
    )
    p.add_argument("--out", default=None, help="write the predictions to FILE.csv or FILE.json")
    p.add_argument("--batch-size", type=int, default=8, help="videos per forward pass (default 8)")
    add_precision_argument(p)
    add_runtime_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.search.classify import TEMPLATES, ClassifyError, classify, write_predictions

    if args.templates == "default":
        templates = TEMPLATES
    elif args.templates == "none":
        templates = ("{}",)
    else:
        from stanvid.data.base import read_lines
        from stanvid.errors import StanvidError

        try:
            templates = tuple(line for _, line in read_lines(args.templates))
        except (StanvidError, UnicodeDecodeError, OSError) as exc:  # the user's input mistake
            raise ClassifyError(f"templates {args.templates}: {exc}") from None
    if args.out is not None:  # fail on a bad output path before any work
        write_predictions([], args.out)
    report = classify(
        args.videos,
        args.model,
        args.labels,
        templates=templates,
        top=args.top,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        progress=not args.no_progress,
    )
    if args.out is not None:
        write_predictions(report.predictions, args.out)
    else:
        for pred in report.predictions:
            best = ", ".join(
                f"{label} {score:.3f}" for label, score in zip(pred.labels, pred.scores, strict=True)
            )
            print(f"{pred.path}: {best}")
    print(report.summary(), file=sys.stderr if args.out is None else sys.stdout)
    return 0
