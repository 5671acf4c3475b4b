"""`stanvid eval CONFIG [--checkpoint C] [--baseline] [--set a.b=v ...] [--out DIR]`: evaluate on the test split.

``C`` is a training checkpoint (``checkpoints/step-*.pt``), a trained model folder (``model/``) or any model
source `stanvid.load_model` reads; without it, the recipe's ``model.source`` is evaluated. ``--baseline`` adds
the zero-shot plain CLIP of ``model.source`` (frames mean-pooled) as a row. Retrieval prints t2v and v2t
R@1/5/10, MdR, MnR, and the dual-softmax numbers separately; recognition prints top-1/top-5. The results are
written as ``eval.json`` and ``eval.txt`` in the output folder. ``--precision`` (default ``auto``: bf16 on a CPU
or GPU with native bf16) sets the arithmetic of the forward passes; features are ranked in float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stanvid.cli.common import add_recipe_overrides
from stanvid.cli.precision import add_precision_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a recipe's test split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="recipe YAML file (configs/*.yaml)")
    p.add_argument("--checkpoint", help="training checkpoint, trained model folder or model source")
    p.add_argument("--baseline", action="store_true", help="add the zero-shot plain CLIP row")
    add_recipe_overrides(p)
    p.add_argument("--out", type=Path, help="where eval.json / eval.txt go (default: train.output_dir)")
    add_precision_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stanvid.training.recipe import load_recipe
    from stanvid.training.runs import evaluate_run

    recipe = load_recipe(args.config, args.overrides)
    report = evaluate_run(
        recipe,
        args.checkpoint,
        baseline=args.baseline,
        out_dir=args.out,
        progress=not args.no_progress,
        precision=args.precision,
    )
    if "table" in report:
        print(report["table"])
        print(f"results: {report['json']}")
    return 0
