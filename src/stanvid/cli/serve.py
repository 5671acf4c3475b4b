"""`stanvid serve INDEX [--host 127.0.0.1 --port 8000 --follow 0.5]`: the search page and JSON API of an index,
following its updates."""

from __future__ import annotations

from stanvid.cli.common import add_runtime_argument
from stanvid.cli.precision import add_precision_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a search page and JSON API for an index",
        description="Web page (search box, thumbnails, playback from the hit) and JSON API "
        "(/api/search, /api/thumbnail/ID, /api/video/ID) over an index.",
    )
    p.add_argument("index", help="index directory written by `stanvid index`")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument(
        "--follow",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="check the index for updates (a `stanvid index` run on it) every SECONDS and answer from each new "
        "state once loaded, without a restart (default 0.5; 0: serve the state opened at start)",
    )
    add_precision_argument(p)
    add_runtime_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from stanvid.errors import VideoIndexError
    from stanvid.search.server.app import create_app

    if not args.follow >= 0:
        raise VideoIndexError(f"--follow must be a number of seconds >= 0, got {args.follow}")
    handler = logging.StreamHandler()  # the index's swaps and refusals, one line each, on stderr
    handler.setFormatter(logging.Formatter("stanvid serve: %(message)s"))
    logger = logging.getLogger("stanvid")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    app = create_app(
        args.index,
        device=args.device,
        precision=args.precision,
        follow=args.follow or None,
        runtime=args.runtime,
    )
    print(f"stanvid: serving {args.index} at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
