"""`stanvid shard ANNOTATIONS VIDEO_DIR OUT`: write WebDataset shards from a split any recipe reads; `stanvid shard
--index SHARDS OUT.json`: count existing shards (video2dataset's) into a shard index (see stanvid.data.shard_writer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stanvid.cli.common import add_encode_options, encode_settings


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "shard",
        help="write WebDataset tar shards from a dataset's annotations (or index existing shards)",
        description=(
            "Write the videos of a split (ANNOTATIONS as --dataset reads them, videos under VIDEO_DIR) into OUT "
            "as WebDataset shards of --samples-per-shard samples (KEY.mp4 or the video's own extension, KEY.txt "
            "or KEY.cls, KEY.json) and OUT/PREFIXshards.json, their index with the sample counts. --reencode "
            "converts every video as prepare-videos does. A re-run skips finished shards. With --index, count "
            "the samples of existing shards SHARDS (a brace pattern, quoted) into the shard index OUT.json, so "
            "that runs on them (streamed from pipe:/URLs too) need not count them again."
        ),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="ARG", help="ANNOTATIONS VIDEO_DIR OUT, or with --index: SHARDS OUT.json"
    )
    p.add_argument("--index", action="store_true", help="count existing shards into a shard index instead")
    p.add_argument(
        "--dataset",
        default="captions",
        help="how ANNOTATIONS is read (a data.dataset name; default captions)",
    )
    p.add_argument(
        "--task", choices=["retrieval", "recognition"], default=None, help="default: the dataset's"
    )
    p.add_argument(
        "--split",
        choices=["train", "test"],
        default="train",
        help="(for datasets that read splits differently)",
    )
    p.add_argument(
        "--captions", type=Path, default=None, help="caption file (data.captions: MSVD, MSR-VTT train csv)"
    )
    p.add_argument("--class-names", type=Path, default=None, help="class list (recognition)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="(default: 1000, as video2dataset)")
    p.add_argument("--prefix", default="", help="shard file name prefix, e.g. train- (several splits in OUT)")
    p.add_argument(
        "--reencode", action="store_true", help="re-encode as prepare-videos (--fps, --short-side, ...)"
    )
    add_encode_options(p, when="with --reencode: ")
    p.add_argument("--frame-rate", type=float, default=None, help="of frame folders (default: 30)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default: 1)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from stanvid.errors import ConfigError

    if args.index:
        if len(args.inputs) != 2:
            raise ConfigError("shard --index takes SHARDS OUT.json")
        return _index(*args.inputs)
    if len(args.inputs) != 3:
        raise ConfigError("shard takes ANNOTATIONS VIDEO_DIR OUT (or --index SHARDS OUT.json)")
    from stanvid.data.datasets import SplitFiles, dataset_task, read_split
    from stanvid.data.shard_writer import write_shards
    from stanvid.video.frames import FRAME_FOLDER_FPS
    from stanvid.video.prepare import PrepareSettings

    annotations, videos, out = (Path(a) for a in args.inputs)
    task = args.task or dataset_task(args.dataset) or "retrieval"
    files = SplitFiles(args.dataset, args.split, task, annotations, videos, args.captions, args.class_names)
    settings = PrepareSettings(**encode_settings(args)) if args.reencode else None
    report = write_shards(
        read_split(files),
        videos,
        out,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
        reencode=settings,
        frame_rate=args.frame_rate or FRAME_FOLDER_FPS,
        workers=args.workers,
        source=f"{args.dataset}:{annotations.resolve()}",
    )
    print(report.summary())
    return 0


def _index(spec: str, out: str) -> int:
    from stanvid.data.shards import load_shards, write_shard_index

    shards = load_shards(spec)
    write_shard_index(out, shards)
    print(f"{shards.describe()}; index {out}")
    return 0
