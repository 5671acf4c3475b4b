"""`stanvid duplicates INDEX [--threshold T] [--min-fraction F] [--json | --csv]`: the files that hold the
same footage, grouped, with the span of each pair that matches."""

from __future__ import annotations

import csv
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "duplicates",
        help="group the files of an index that hold the same footage (re-encoded, trimmed, scaled copies)",
        description="Find the files of an index that hold the same footage, from the stored segment "
        "embeddings (nothing is decoded): segments at least THRESHOLD similar, then a check that they line up "
        "in time. Prints each group and, for each pair of files in it, which spans match.",
    )
    p.add_argument("index", help="index directory written by `stanvid index`")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine two segments of one footage reach at least (default: the measured 0.9)")  # fmt: skip
    p.add_argument("--min-fraction", type=float, default=None,
                   help="share of the shorter file's segments that must line up (default 0.3)")  # fmt: skip
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the groups as JSON")
    out.add_argument("--csv", action="store_true", help="print one CSV row per matching pair of files")
    p.set_defaults(func=run)


def run(args) -> int:
    from stanvid.search.index import open_index

    with open_index(args.index, follow=None) as index:
        groups = index.duplicates(args.threshold, min_fraction=args.min_fraction)
    if args.json:
        print(json.dumps([g.to_dict() for g in groups], indent=2))
        return 0
    if args.csv:
        fields = ["group", "a", "a_start", "a_end", "b", "b_start", "b_end", "segments", "score", "shift"]
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for number, group in enumerate(groups, 1):
            for m in group.pairs:
                row = {k: v for k, v in m.to_dict().items() if k in fields}
                writer.writerow({"group": number, **row})
        return 0
    if not groups:
        print("no copies found")
    for number, group in enumerate(groups, 1):
        print(f"group {number}: {len(group.files)} files")
        for m in group.pairs:
            print(f"  {m.a} {m.a_start:.1f}-{m.a_end:.1f} s  ==  {m.b} {m.b_start:.1f}-{m.b_end:.1f} s  "
                  f"({m.segments} segments, cosine {m.score:.3f})")  # fmt: skip
    return 0
