"""`stanvid embed VIDEO_DIR|SHARDS --model M --out features.npy|features.parquet [--segment-seconds S]`."""

from __future__ import annotations

import re

from stanvid.cli.common import add_model_overrides, add_runtime_argument, parse_overrides
from stanvid.cli.precision import add_precision_argument

_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() accepts "²", which int() refuses


def add_parser(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="write the embedding of every video (or segment) of a folder to .npy + .json or .parquet",
        description="Embed every video (or every --segment-seconds span) under VIDEO_DIR with the index's "
        "machinery (resumable working index in OUT.index/, only new or changed files re-encoded), then write "
        "one row per video or segment (path, start, end, vector) to OUT. Given WebDataset shards instead (a "
        "tar, a brace pattern such as 'shards/{00000..00099}.tar', a shard index .json, pipe:/URL shards), "
        "one row per sample (shard, key, caption, vector), resumable per shard in OUT.parts/.",
    )
    p.add_argument(
        "video_dir", help="folder of videos (searched recursively), or shards (quote brace patterns)"
    )
    p.add_argument("--model", required=True, help="any model stanvid.load_model reads")
    p.add_argument(
        "--out",
        required=True,
        help="features.npy (vectors; rows described in features.json) or features.parquet (needs pyarrow)",
    )
    p.add_argument("--segment-seconds", type=float, default=None, metavar="S", help="one row per S seconds")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="embed only share I of N of the files (a stable hash of their path) into OUT-0000I-of-0000N; "
        "under torchrun each rank takes its own share",
    )
    add_model_overrides(p)
    p.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (default 16)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    add_precision_argument(p)
    add_runtime_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-pipe",
        action="store_true",
        help="run the pipe: commands a shard index .json names (refused by default: a downloaded index could "
        "run anything; pipe: patterns you type yourself always run)",
    )
    p.add_argument(
        "--max-sample-mb",
        type=int,
        default=128,
        metavar="MB",
        help="shards: the most one sample's members may hold once inflated (default 128; a larger one stops "
        "the run, named)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.data.shards import is_shard_spec
    from stanvid.errors import EmbedError
    from stanvid.search.embed import embed_videos

    common = dict(
        model_overrides=parse_overrides(args.overrides),
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        progress=not args.no_progress,
    )
    if is_shard_spec(args.video_dir):
        from stanvid.search.shard_embed import embed_shards

        if args.segment_seconds is not None:
            raise EmbedError("--segment-seconds: shards are embedded one row per sample")
        if args.shard is not None:
            raise EmbedError(
                "--shard: it shares out the files of a folder; give each machine its own shards instead "
                "(e.g. {00000..00049}.tar and {00050..00099}.tar)"
            )
        if args.max_sample_mb < 1:
            raise EmbedError(f"--max-sample-mb must be at least 1, got {args.max_sample_mb}")
        result = embed_shards(
            args.video_dir,
            args.out,
            args.model,
            allow_pipe=args.allow_pipe,
            max_sample_mb=args.max_sample_mb,
            **common,
        )
    else:
        result = embed_videos(
            args.video_dir,
            args.out,
            args.model,
            shard=_shard(args.shard),
            segment_seconds=args.segment_seconds,
            **common,
        )
    print(result.summary())
    return 0


def _shard(text: str | None) -> tuple[int, int] | None:
    from stanvid.errors import EmbedError

    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and _DIGITS.fullmatch(i.strip()) and _DIGITS.fullmatch(n.strip()) and int(i) < int(n)):
        raise EmbedError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)
