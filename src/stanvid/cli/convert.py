"""`stanvid convert SRC DST`: any checkpoint `load_model` reads -> a stanvid directory (safetensors + JSON)."""

from __future__ import annotations

from pathlib import Path

from stanvid.cli.common import add_model_overrides, parse_overrides
from stanvid.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (OpenAI, Hugging Face, STAN, CLIP4Clip) to stanvid format",
        description="Load any checkpoint stanvid reads and write it as config.json + model.safetensors.",
    )
    p.add_argument("src", help="checkpoint file or directory")
    p.add_argument("dst", help="output directory")
    p.add_argument(
        "--config",
        help="Hugging Face config.json or open_clip open_clip_config.json (or its folder): the architecture of "
        "a state dict that does not record it (needed for official STAN .pth files)",
    )
    add_model_overrides(p)
    p.add_argument("--force", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.checkpoints.load import convert_checkpoint

    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.force:
        raise ConfigError(f"{dst}: exists and is not empty; pass --force to overwrite")
    summary = convert_checkpoint(args.src, dst, config=args.config, **parse_overrides(args.overrides))
    for key, value in summary.items():
        print(f"{key:>12}: {value}")
    return 0
