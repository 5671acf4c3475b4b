"""The video files of a folder that an index holds, with the identity (size, mtime, device, inode) that the
index records for each. The walk itself, with its symbolic-link policy, is `stanvid.video.folders.walk_videos`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from stanvid.search.index.records import _FileEntry
from stanvid.video.decode import VIDEO_EXTENSIONS
from stanvid.video.folders import find_videos, walk_videos

__all__ = ["VIDEO_EXTENSIONS", "_share", "_walk", "find_videos"]


def _walk(root: Path, exclude: Path | None, skipped: list[tuple[str, str]] | None = None) -> list[_FileEntry]:
    """The index's view of `walk_videos(root)`: one `_FileEntry` per video file, sorted by relative path."""
    return [
        _FileEntry(relpath, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
        for relpath, st in walk_videos(root, exclude, skipped, folder="indexed folder")
    ]


def _share(entries: list[_FileEntry], shard: tuple[int, int] | None) -> list[_FileEntry]:
    """The files of share i of n: a stable hash of the relative path, so a file stays in its share whatever
    else is added to or removed from the folder."""
    if shard is None:
        return entries
    i, n = shard
    return [
        e
        for e in entries
        if int.from_bytes(hashlib.sha1(e.relpath.encode("utf-8", "surrogateescape")).digest()[:8], "big") % n
        == i
    ]
