"""`stanvid train CONFIG [--set a.b=v ...] [--resume] [--dry-run] [--out DIR]`: train from a recipe.

Runs the same on one process and under ``torchrun --nproc-per-node N -m stanvid.cli train CONFIG`` (DDP).
``--dry-run`` reads every annotation file, finds every video, loads the model source, prints the resolved
recipe and the run's plan, and trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stanvid.cli.common import add_recipe_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe (configs/*.yaml)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="recipe YAML file (configs/*.yaml)")
    add_recipe_overrides(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate config, data and model source; train nothing"
    )
    p.add_argument("--out", type=Path, help="output folder (default: train.output_dir of the recipe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stanvid.training.recipe import load_recipe
    from stanvid.training.runs import check_run, train_run

    recipe = load_recipe(args.config, args.overrides)
    if args.out is not None:
        recipe.train.output_dir = str(args.out)
    if args.dry_run:
        report = check_run(recipe, resume=args.resume)
        print(recipe.to_yaml().rstrip())
        print(f"# dry run of {args.config}: nothing was trained")
        print(report)
        return 0
    result = train_run(recipe, resume=args.resume, progress=not args.no_progress)
    if result.model_dir is not None:
        loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
        print(
            f"trained {result.steps} steps ({result.epochs} epochs) in {result.seconds:.0f} s, last loss {loss}; "
            f"model in {result.model_dir}",
            file=sys.stderr,
        )
    return 0
