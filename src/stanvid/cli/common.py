"""Options that several commands share, each defined once: the model `--set` and the recipe `--set`.

Two kinds of `--set KEY=VALUE` exist. Commands that load a model (convert, index, embed) take `load_model`
overrides (`grad_checkpointing=false`, `num_frames=8`), typed by `stanvid.models.config.MODEL_OVERRIDES` exactly as
the Python keywords are; commands that run a recipe (train, eval) take dotted recipe keys
(`model.grad_checkpointing=false`, `optim.lr=1e-5`), typed by `stanvid.training.recipe.load_recipe`.
"""

from __future__ import annotations

import argparse
from typing import Any

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
