"""The `--precision` option shared by every command that encodes (index, search, serve, eval, classify, embed)."""

from __future__ import annotations

import argparse

from stanvid.precision import PRECISIONS


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="arithmetic of the forward passes: auto (bf16 where the CPU or GPU has native bf16, else fp32), "
        "fp32, bf16, fp16, int8 (CPU only); stored embeddings are float32 whatever it is "
        f"(default {default})",
    )
