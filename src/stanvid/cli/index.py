"""`stanvid index VIDEO_DIR --model SOURCE --out INDEX`: build or update a searchable index of a folder.

Under `torchrun --no-python ... stanvid index ...` (or `torchrun -m stanvid.cli index ...`) each rank encodes
its share of the files and rank 0 merges them.
"""

from __future__ import annotations

from stanvid.cli.common import add_model_overrides, add_runtime_argument, parse_overrides
from stanvid.cli.precision import add_precision_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "index",
        help="index a folder of videos for text search (new/changed files only on re-runs)",
        description="Embed every video (or every --segment-seconds span) under VIDEO_DIR "
        "(mp4, mkv, webm, mov, avi; recursive) and store it in a searchable index.",
    )
    p.add_argument("video_dir", help="folder of videos (searched recursively)")
    p.add_argument(
        "--model",
        required=True,
        help="any model stanvid.load_model reads: a saved stanvid folder, Hugging Face or OpenAI CLIP",
    )
    p.add_argument("--out", required=True, help="index directory (created, or updated in place)")
    p.add_argument(
        "--segment-seconds",
        type=float,
        default=None,
        metavar="S",
        help="one entry per S-second segment (default: one per video)",
    )
    add_model_overrides(p)
    p.add_argument(
        "--batch-size", type=int, default=16, help="clips per forward pass and per commit (default 16)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes running ahead of the model (default: 1 on a CPU, every core but one beside "
        "a GPU; 0 decodes in-process)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_precision_argument(p)
    add_runtime_argument(p)
    p.add_argument(
        "--index",
        dest="index_kind",
        choices=("auto", "flat", "ivf", "ivfpq"),
        default="auto",
        help="vector index: exact (flat), inverted file of float32 vectors (ivf) or of PQ codes re-ranked exactly "
        "(ivfpq), or auto: flat below --approx-threshold vectors, ivfpq from there",
    )
    p.add_argument(
        "--approx-threshold",
        type=int,
        default=None,
        metavar="N",
        help="vectors from which `auto` builds an approximate index (default 100000)",
    )
    p.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF cells searched per query (default: the fewest measured to reach --target-recall)",
    )
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N), at most N / 39)")
    p.add_argument(
        "--target-recall",
        type=float,
        default=None,
        metavar="R",
        help="recall@10 against exact search that nprobe is measured to reach (default 0.95)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="train the vector index again from every stored vector (runs retrain on their own past 4x growth "
        "or drift)",
    )
    p.add_argument(
        "--from-embeddings",
        default=None,
        metavar="PATH",
        help="import `stanvid embed` outputs (a .npy + .json, a .parquet, a folder or a glob of them) instead "
        "of encoding",
    )
    p.add_argument(
        "--no-moments",
        action="store_true",
        help="do not keep the moment features `stanvid search --moments` cuts moments from (the model's "
        "num_frames frames per --moment-window seconds of video: indexing costs more, the index grows; see "
        "docs/search.md)",
    )
    p.add_argument(
        "--moment-window",
        type=float,
        default=None,
        metavar="S",
        help="seconds each clip of moment samples spans (default 1; longer: cheaper, coarser)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.search.index import DEFAULT_APPROX_THRESHOLD, TARGET_RECALL, build_index

    report = build_index(
        args.video_dir,
        args.out,
        args.model,
        model_overrides=parse_overrides(args.overrides),
        segment_seconds=args.segment_seconds,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        index_kind=args.index_kind,
        approx_threshold=args.approx_threshold or DEFAULT_APPROX_THRESHOLD,
        nprobe=args.nprobe,
        nlist=args.nlist,
        target_recall=TARGET_RECALL if args.target_recall is None else args.target_recall,
        rebuild=args.rebuild,
        from_embeddings=args.from_embeddings,
        progress=not args.no_progress,
        moments=False if args.no_moments else (True if args.moment_window is None else args.moment_window),
    )
    from stanvid.distributed import launch_env

    if launch_env("RANK", 0) == 0:
        print(report.summary())
    return 0
