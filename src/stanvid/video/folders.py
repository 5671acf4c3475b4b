"""The video files of a folder: one walk for every command that takes a folder (index, embed, classify,
prepare-videos), so a file one of them accepts is never silently left out by another.

What counts: names ending in one of `stanvid.video.decode.VIDEO_EXTENSIONS` (any case), regular files, found
recursively without following symlinked folders. What does not, and why:
- hidden names (a leading dot, files and folders): macOS `._clip.mp4` resource forks and tools' caches carry
  video extensions but are not videos;
- an `exclude` folder inside the tree (an index or an output folder written into the source folder);
- a symbolic link to a file outside the folder: following it would let an index (and the server that serves
  it) read files that are not the folder's; a link that resolves inside is followed;
- a name that is not valid UTF-8: it cannot be stored (SQLite text, JSON manifests).
The last two are reported to the caller as (relative path, reason); the name is written with backslash
escapes for its undecodable bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stanvid.video.decode import VIDEO_EXTENSIONS


def walk_videos(
    root: str | os.PathLike,
    exclude: str | os.PathLike | None = None,
    skipped: list[tuple[str, str]] | None = None,
    folder: str = "folder",
) -> list[tuple[str, os.stat_result]]:
    """(relative POSIX path, stat) of every video file under `root`, sorted by relative path.

    Files left out for a reason the user may want to know (links out of the folder, undecodable names) are
    appended to `skipped` as (printable relative path, reason); `folder` is what the reasons call `root`."""
    root = Path(root)
    real_root = root.resolve()  # where a followed link must land
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[str, os.stat_result]] = []
    # os.scandir, one directory at a time (depth first, names sorted): the listing's file types and one stat
    # per video file, nothing per name in Python paths (a walk of 100,000 files in a fraction of a second)
    pending = [(os.fspath(root), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue  # unreadable, or gone since it was listed (as os.walk skips it)
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if _is_dir(entry):
                # a linked folder is never entered; the excluded one neither
                if not entry.is_symlink() and (excluded is None or Path(entry.path).resolve() != excluded):
                    subdirs.append((entry.path, f"{prefix}{name}/"))
                continue
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            relpath = prefix + name
            if not _is_utf8(relpath):
                _note(skipped, printable_name(relpath), "the file name is not valid UTF-8 (rename it)")
                continue
            try:
                st = entry.stat()  # follows a link, as opening the file will
            except OSError:
                continue  # vanished between listing and stat (or a dangling link): not in the folder
            if entry.is_symlink() and not is_inside(Path(os.path.realpath(entry.path)), real_root):
                _note(skipped, relpath, f"a symbolic link to a file outside the {folder} (not followed)")
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((relpath, st))
        pending.extend(reversed(subdirs))
    return sorted(found, key=lambda item: item[0])


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def find_videos(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The video files under `root` (see the module docstring for what counts), sorted by relative path."""
    root = Path(root)
    return [root / relpath for relpath, _ in walk_videos(root, exclude)]


def printable_name(name: str) -> str:
    """A file name with undecodable bytes written as \\xNN, for messages and failure lists."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _note(skipped: list[tuple[str, str]] | None, relpath: str, reason: str) -> None:
    if skipped is not None:
        skipped.append((relpath, reason))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk decodes undecodable bytes to lone surrogates
        return False
    return True


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
