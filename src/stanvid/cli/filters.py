"""The filter and page options of the search commands (`stanvid search`): --in, --after, --before,
--min-duration, --max-duration, --created-after, --created-before, --title, --offset."""

from __future__ import annotations

import argparse
from typing import Any

# option -> (the filter field it sets, help)
_OPTIONS = {
    "--in": (
        "in",
        "only files under this folder or matching this glob, relative to the indexed folder "
        "('trips/2024/**', '**/*.mov', 'lectures')",
    ),  # fmt: skip
    "--after": (
        "after",
        "only files modified at or after this date/time or age (2024-05-01, 2024-05-01T10:00Z, 30d)",
    ),
    "--before": ("before", "only files modified before this date/time or age"),
    "--min-duration": ("min_duration", "only videos at least this long (seconds, or 90s, 1.5m, 2h)"),
    "--max-duration": ("max_duration", "only videos at most this long"),
    "--created-after": (
        "created_after",
        "only videos whose container says they were recorded at or after this",
    ),
    "--created-before": ("created_before", "only videos whose container says they were recorded before this"),
    "--title": ("title", "only videos whose container title contains this text (case-insensitive)"),
}


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (applied inside the search: k hits whenever k segments pass)")
    for option, (field, text) in _OPTIONS.items():
        group.add_argument(option, dest=f"filter_{field}", metavar="VALUE", default=None, help=text)
    parser.add_argument(
        "--offset", type=int, default=0, help="skip this many results: the next page (default 0)"
    )


def filters_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The filter fields given on the command line, by their API names (`stanvid.search.index.filters`)."""
    return {field: getattr(args, f"filter_{field}") for field, _ in _OPTIONS.values()}
