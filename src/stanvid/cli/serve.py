"""`stanvid serve INDEX [--host 127.0.0.1 --port 8000]`: the search page and JSON API of an index."""

from __future__ import annotations

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
    add_precision_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from stanvid.search.server.app import create_app

    app = create_app(args.index, device=args.device, precision=args.precision)
    print(f"stanvid: serving {args.index} at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
