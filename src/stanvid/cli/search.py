"""`stanvid search INDEX ["text"] [--image P] [--like VIDEO[:START-END]] [--group-by file] -k 10 [--json]`
with filters (`--in`, `--after`, `--before`, `--min-duration`, ...: `stanvid.cli.filters`) and `--offset`."""

from __future__ import annotations

import json
import sys

from stanvid.cli.common import add_runtime_argument
from stanvid.cli.filters import add_filter_arguments, filters_from_args
from stanvid.cli.precision import add_precision_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search an index by text, image or example clip",
        description="Rank indexed videos/segments by similarity to TEXT, an image, an example clip or a "
        "weighted combination of them (each part L2-normalized, weighted, summed, normalized again), using "
        "the model the index was built with.",
    )
    p.add_argument("index", help="index directory written by `stanvid index`")
    p.add_argument("text", nargs="?", default=None, help="what happens in the moment you are looking for")
    p.add_argument("--image", metavar="IMAGE", help="find segments that look like this picture")
    p.add_argument(
        "--like",
        metavar="VIDEO[:START-END]",
        help="find segments like this clip: a video file (inside or outside the index; START-END in "
        "seconds or m:ss) or an indexed segment id",
    )
    p.add_argument("--text-weight", type=float, default=1.0, help="weight of TEXT in a combination (1)")
    p.add_argument("--image-weight", type=float, default=1.0, help="weight of --image in a combination (1)")
    p.add_argument("--like-weight", type=float, default=1.0, help="weight of --like in a combination (1)")
    p.add_argument(
        "--group-by",
        choices=["file"],
        default=None,
        help="one result per file: its best segment, and the score of every segment (a timeline)",
    )
    p.add_argument(
        "--moments",
        action="store_true",
        help="each hit is the moment the query describes: its start and end, not a fixed segment",
    )
    p.add_argument("--pad", type=float, default=0.0, metavar="SECONDS", help="widen each moment (default 0)")
    p.add_argument(
        "--export", metavar="DIR", default=None, help="with --moments: write each moment as a file to DIR"
    )
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON list")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_precision_argument(p)
    add_runtime_argument(p)
    add_filter_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.search.index import open_index
    from stanvid.search.index.filters import parse_filters
    from stanvid.search.query import FileHit, Query, QueryError, search, to_dicts

    if args.text is None and args.image is None and args.like is None:
        raise QueryError("nothing to search for: give TEXT, --image or --like")
    query = Query(
        text=args.text,
        image=args.image,
        like=args.like,
        text_weight=args.text_weight,
        image_weight=args.image_weight,
        like_weight=args.like_weight,
    )
    query.parts()  # bad weights and filters fail before the model is loaded
    filters = parse_filters(filters_from_args(args))
    if args.export is not None and not args.moments:
        raise QueryError("--export writes moments: give --moments too")
    with open_index(args.index, device=args.device, precision=args.precision, runtime=args.runtime) as index:
        hits = search(
            index,
            query,
            args.k,
            group_by=args.group_by,
            moments=args.moments,
            pad=args.pad,
            filters=filters,
            offset=args.offset,
        )
        if args.moments and (note := index.moments_note()):
            print(note, file=sys.stderr)
        if args.export is not None:
            _export(index, hits, args.export)
    if args.json:
        print(json.dumps(to_dicts(hits), indent=2))
        return 0
    if not hits:
        print("no results (the index is empty)" if filters is None and not args.offset else "no results")
    for rank, hit in enumerate(hits, args.offset + 1):
        best = hit.best if isinstance(hit, FileHit) else hit
        print(f"{rank:3d}  {best.score:6.3f}  {_clock(best.start)}-{_clock(best.end)}  {best.path}")
        if isinstance(hit, FileHit) and len(hit.timeline) > 1:
            print("     " + _strip([t["score"] for t in hit.timeline]))
    return 0


def _strip(scores: list[float]) -> str:
    """The scores of a file's segments as a one-line bar chart, low to high: ▁▂▃▄▅▆▇█."""
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(scores), max(scores)
    span = hi - lo or 1.0
    return "".join(bars[min(7, int((s - lo) / span * 8))] for s in scores) + f"  ({lo:.3f} .. {hi:.3f})"


def _clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


def _export(index, hits, out_dir: str) -> None:
    """Cut each moment out of its (still indexed) file into `out_dir`, one line per file written."""
    from stanvid.search.moment_export import export_moment

    for hit in hits:
        opened = index.open_video(hit.file_id)  # still the indexed file, or an error naming it
        if opened is not None:
            opened[0].close()
        cut = export_moment(hit.path, hit.start, hit.end, out_dir)
        how = "stream copy" if cut.method == "copy" else "re-encoded"
        print(f"wrote {cut.path} ({cut.frames} frames, {how})", file=sys.stderr)
