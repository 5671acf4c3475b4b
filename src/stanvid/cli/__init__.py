"""The `stanvid` command: a thin shell over the library.

Each subcommand lives in its own module under `stanvid.cli` with two functions, `add_parser(subparsers)`
and `run(args) -> int`; this file lists them explicitly. An input mistake (any `StanvidError`, a missing
file) prints one line to stderr and exits 2, never a traceback.

The command modules import their optional dependencies (faiss, fastapi, huggingface_hub, ...) only inside
`run`, so every command's arguments and `--help` are complete whatever is installed; a run that needs a
missing one prints which extra to install (`OPTIONAL_PACKAGES`).

May import: everything (the top of the layers); nothing imports it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from importlib import import_module

# subcommand name -> module under stanvid.cli (explicit, no discovery)
COMMANDS = {
    "demo": "stanvid.cli.demo",
    "convert": "stanvid.cli.convert",
    "export": "stanvid.cli.export",
    "push": "stanvid.cli.push",
    "prepare-videos": "stanvid.cli.prepare",
    "shard": "stanvid.cli.shard",
    "train": "stanvid.cli.train",
    "eval": "stanvid.cli.evaluate",
    "index": "stanvid.cli.index",
    "search": "stanvid.cli.search",
    "eval-moments": "stanvid.cli.eval_moments",
    "duplicates": "stanvid.cli.duplicates",
    "serve": "stanvid.cli.serve",
    "classify": "stanvid.cli.classify",
    "embed": "stanvid.cli.embed",
}

# optional top-level module -> what to install for it (pyproject's optional-dependencies, or the package itself)
OPTIONAL_PACKAGES = {
    "faiss": "stanvid[search]",
    "fastapi": "stanvid[search]",
    "starlette": "stanvid[search]",
    "uvicorn": "stanvid[search]",
    "huggingface_hub": "stanvid[hub]",
    "pyarrow": "stanvid[parquet]",
    "onnx": "stanvid[onnx]",
    "onnxruntime": "stanvid[onnx]",
    "onnxscript": "stanvid[onnx]",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stanvid", description="STAN video-text models on CLIP.")
    parser.add_argument("--version", action="version", version=f"stanvid {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        import_module(module).add_parser(sub)
    return parser


def _version() -> str:
    from stanvid import __version__

    return __version__


def install_stop_handlers() -> None:
    """Make SIGTERM stop a command the way Ctrl-C (SIGINT) does: by unwinding, not by dying on the spot.

    Python's default for SIGTERM ends the process at once, without its exit handlers, which leaves the data
    loader's worker processes (and their forkserver) running as orphans. Raised as ``SystemExit(128 + 15)``,
    it runs every ``finally`` (atomic writes commit or roll back as on any error) and then multiprocessing's
    exit handler, which terminates and joins the workers. Servers install their own handlers while serving.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from stanvid.errors import StanvidError

    if (sys.argv[1:] if argv is None else argv)[:1] == ["demo"]:
        from stanvid.cli.demo import sleeping_threads_when_busy

        sleeping_threads_when_busy()  # before the commands' modules load torch
    parser = build_parser()
    args = parser.parse_args(argv)
    install_stop_handlers()
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        package = (exc.name or "").partition(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        print(
            f"stanvid {args.command}: needs the package {package!r}; "
            f"install it with: pip install '{OPTIONAL_PACKAGES[package]}'",
            file=sys.stderr,
        )
        return 2
    except StanvidError as exc:
        print(f"stanvid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(
            f"stanvid {args.command}: error: {exc.filename or exc}: no such file or directory",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"stanvid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
