"""The video files of a folder that an index holds: extensions, the symbolic-link policy, names that cannot
be stored."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stanvid.index.records import _FileEntry
from stanvid.video_io import VIDEO_EXTENSIONS


def _walk(root: Path, exclude: Path | None, skipped: list[tuple[str, str]] | None = None) -> list[_FileEntry]:
    """Video files under `root` (recursive, symlinked folders not followed), sorted by relative path.

    Symbolic link policy: a link to a file is indexed only when it resolves inside `root` (a link out of the
    folder would let the index, and the server, read files that are not the folder's). A name that is not
    valid UTF-8 cannot be stored (SQLite text, JSON) and is skipped. Both are appended to `skipped` as
    (relative path, reason), the name written with backslash escapes for its undecodable bytes.
    """
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if exclude is None or (here / d).resolve() != exclude)
        for name in filenames:
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            path = here / name
            relpath = path.relative_to(root).as_posix()
            if not _is_utf8(relpath):
                if skipped is not None:
                    skipped.append(
                        (_printable(relpath), "the file name is not valid UTF-8 (rename it to index it)")
                    )
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # vanished between listing and stat (or a dangling link): not in the folder
            if path.is_symlink() and not _inside(Path(os.path.realpath(path)), root):
                if skipped is not None:
                    skipped.append(
                        (relpath, "a symbolic link to a file outside the indexed folder (not followed)")
                    )
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append(_FileEntry(relpath, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
    return sorted(entries, key=lambda e: e.relpath)


def find_videos(root: str | os.PathLike) -> list[Path]:
    """The video files an index of `root` would hold (same extensions and walk), sorted by relative path."""
    root = Path(root)
    return [root / e.relpath for e in _walk(root, exclude=None)]


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk decodes undecodable bytes to lone surrogates
        return False
    return True


def _printable(name: str) -> str:
    """A file name with undecodable bytes written as \\xNN, for messages and the failure list."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
