"""Options that several commands share, each defined once: the model `--set`, the recipe `--set`, and the
re-encode options of `prepare-videos` and `shard --reencode`.

Two kinds of `--set KEY=VALUE` exist. Commands that load a model (convert, index, embed) take `load_model`
overrides (`grad_checkpointing=false`, `num_frames=8`), typed by `stanvid.models.config.MODEL_OVERRIDES` exactly as
the Python keywords are; commands that run a recipe (train, eval) take dotted recipe keys
(`model.grad_checkpointing=false`, `optim.lr=1e-5`), typed by `stanvid.training.recipe.load_recipe`.
"""

from __future__ import annotations

import argparse
from typing import Any

from stanvid.checkpoints.onnx_runtime import RUNTIMES
from stanvid.models.config import MODEL_OVERRIDES, parse_model_override


def add_model_overrides(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable) for commands that load a model; read it back with `parse_overrides`."""
    _add_set(
        parser,
        "model override passed to load_model (repeatable), e.g. temporal=meanP|seqTransf|stan, "
        "stan_depth=N, num_frames=N, pooling=mean|normalized_mean, grad_checkpointing=true|false, "
        "similarity=mug (Mug-STAN: per-frame vectors kept, search re-ranked by the head); for OpenAI-layout "
        "state dicts, which do not record them: act=gelu|quick_gelu, vision_heads=N, text_heads=N, "
        f"image_mean=R,G,B, image_std=R,G,B. Keys: {', '.join(MODEL_OVERRIDES)}",
    )


def add_runtime_argument(parser: argparse.ArgumentParser) -> None:
    """`--runtime torch|onnxruntime` for the commands that encode with a model (index, search, serve, classify,
    embed); `args.runtime` goes to the library's `runtime=` (`stanvid.load_model`)."""
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="what runs the model: torch, or onnxruntime (through its ONNX export, written once into the cache; "
        "see `stanvid export`). Default: onnxruntime for an export folder, torch for anything else. Indexes "
        "built with one runtime are searched with the other (same fingerprint)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> overrides typed by `stanvid.models.config.MODEL_OVERRIDES` (unknown keys refused)."""
    return dict(parse_model_override(item) for item in items)


def add_recipe_overrides(parser: argparse.ArgumentParser) -> None:
    """`--set a.b=VALUE` (repeatable) for commands that run a recipe; `args.overrides` goes to `load_recipe`."""
    _add_set(
        parser,
        "override a recipe value, e.g. --set optim.lr=1e-5 --set data.root=/datasets/msrvtt "
        "--set model.grad_checkpointing=false (repeatable)",
    )


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set KEY=VALUE` option both kinds share; what the values mean is the caller's."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_encode_options(parser: argparse.ArgumentParser, when: str = "") -> None:
    """`--fps`, `--short-side`, `--codec`, `--gop`, `--crf`, `--preset`: how videos are re-encoded (the fields
    of `stanvid.video.prepare.PrepareSettings`, with its defaults); read them back with `encode_settings`.
    ``when`` starts each help text (``"with --reencode: "`` where re-encoding is optional)."""
    parser.add_argument("--fps", type=float, default=3.0, help=f"{when}output frame rate (default: 3)")
    parser.add_argument(
        "--short-side",
        type=int,
        default=224,
        help=f"{when}output shortest side in pixels, even; 0 keeps the size (default: 224)",
    )
    parser.add_argument(
        "--codec",
        default="h264",
        choices=["h264", "hevc", "vp9", "av1"],
        help=f"{when}output codec (default: h264)",
    )
    parser.add_argument(
        "--gop", type=int, default=None, help=f"{when}keyframe interval in frames (default: one per second)"
    )
    parser.add_argument("--crf", type=int, default=23, help=f"{when}quality, lower is better (default: 23)")
    parser.add_argument(
        "--preset", default="veryfast", help=f"{when}x264/x265 speed preset (default: veryfast)"
    )


def encode_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `add_encode_options` of a parsed command line as `PrepareSettings` keywords (``--short-side 0``:
    None, the size kept)."""
    return {
        "fps": args.fps,
        "short_side": args.short_side or None,
        "codec": args.codec,
        "gop": args.gop,
        "crf": args.crf,
        "preset": args.preset,
    }
