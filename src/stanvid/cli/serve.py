"""`stanvid serve INDEX [--host 127.0.0.1 --port 8000 --follow 0.5]`: the search page and JSON API of an index,
following its updates."""

from __future__ import annotations

import errno
import socket

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
    p.add_argument(
        "--port", type=int, default=8000, help="port, 1-65535, or 0 for any free one (default 8000)"
    )
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

    from stanvid.errors import ConfigError, VideoIndexError
    from stanvid.search.server.app import create_app

    if not args.follow >= 0:
        raise VideoIndexError(f"--follow must be a number of seconds >= 0, got {args.follow}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535 (0: any free port), got {args.port}")
    handler = logging.StreamHandler()  # the index's swaps and refusals, one line each, on stderr
    handler.setFormatter(logging.Formatter("stanvid serve: %(message)s"))
    logger = logging.getLogger("stanvid")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        app = create_app(
            args.index,
            device=args.device,
            precision=args.precision,
            follow=args.follow or None,
            runtime=args.runtime,
        )
        _serve(app, args)
    finally:  # the handler holds this run's stderr: a caller in the same process (a test) must not inherit it
        logger.removeHandler(handler)
    return 0


def _serve(app, args) -> None:
    """Listen, say so, and serve until stopped."""
    import uvicorn

    sock = listen(args.host, args.port)
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"stanvid: serving {args.index} at http://{shown}:{port}/", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()


def listen(host: str, port: int):
    """A listening TCP socket on `host`:`port`, or a ConfigError saying in one line why there is none (port in
    use, no permission, an address this machine does not have). uvicorn then serves on it, so the command says
    "serving" only once it listens, and never prints uvicorn's own start-up traceback."""
    from stanvid.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r}: not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock
