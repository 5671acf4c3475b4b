"""A container's own metadata: the creation time and title a camera, phone or editor wrote into the file
(MP4/MOV `creation_time`, Matroska `DATE`/`creation_time`, `title`), recorded by `stanvid index` so a search
can be filtered on them.

Only the tags are read (the container's header, no packet): a file without them, or with tags that do not
parse, has none (`None`), as most generated and re-encoded files do."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import av

MAX_TITLE_CHARS = 500  # a title is a label; longer text is cut rather than stored whole

_CREATED_KEYS = ("creation_time", "date", "com.apple.quicktime.creationdate", "date_recorded")


@dataclass(frozen=True)
class ContainerTags:
    created: float | None = None  # POSIX seconds (UTC)
    title: str | None = None


def parse_tag_time(text: str) -> float | None:
    """POSIX seconds from a tag's ISO 8601 text ("2024-05-01T10:00:00.000000Z", "2024-05-01 10:00:00",
    "2024-05-01"); times without a zone are UTC; None for text that is no such time."""
    text = text.strip().replace(" ", "T", 1)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def container_tags(path: str | os.PathLike) -> ContainerTags:
    """The creation time and title of a video file's container (its first video stream's when the container
    has none). A file that cannot be opened has no tags: it is the decoder's place to report it."""
    try:
        with av.open(os.fspath(path), mode="r", metadata_errors="ignore") as container:
            tags = [dict(container.metadata)]
            tags += [dict(s.metadata) for s in container.streams.video[:1]]
    except (av.error.FFmpegError, OSError):
        return ContainerTags()
    created = title = None
    for found in tags:
        lower = {str(k).lower(): str(v) for k, v in found.items()}
        if created is None:
            created = next(
                (
                    t
                    for key in _CREATED_KEYS
                    if key in lower and (t := parse_tag_time(lower[key])) is not None
                ),
                None,
            )
        if title is None and lower.get("title", "").strip():
            title = lower["title"].strip()[:MAX_TITLE_CHARS]
    return ContainerTags(created, title)
