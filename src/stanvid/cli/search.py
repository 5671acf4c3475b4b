"""`stanvid search INDEX "text" -k 10 [--json]`: ranked segments, with the model recorded in the index."""

from __future__ import annotations

import json
from importlib.util import find_spec

from stanvid.cli.precision import add_precision_argument

if find_spec("faiss") is None:
    raise ModuleNotFoundError("No module named 'faiss'", name="faiss")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search an index by text",
        description="Rank indexed videos/segments by "
        "similarity to TEXT, using the model the index was built with.",
    )
    p.add_argument("index", help="index directory written by `stanvid index`")
    p.add_argument("text", help="what happens in the moment you are looking for")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON list")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_precision_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.index import open_index

    with open_index(args.index, device=args.device, precision=args.precision) as index:
        hits = index.search(args.text, args.k)
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=2))
        return 0
    if not hits:
        print("no results (the index is empty)")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}  {hit.score:6.3f}  {_clock(hit.start)}-{_clock(hit.end)}  {hit.path}")
    return 0


def _clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"
