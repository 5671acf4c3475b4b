"""WebDataset tar shards: naming them, counting their samples, and reading samples from them.

The format is WebDataset's, as video2dataset writes it: a shard is a tar file of ~1,000 samples, a sample the
consecutive members that share a key (the member name up to the first dot of its last path component:
``000123.mp4``, ``000123.txt``, ``000123.json`` form sample ``000123`` with fields ``mp4``, ``txt``,
``json``; field names lower-cased). Members whose name starts and ends in ``__``, names without a dot and
anything but regular files are not part of any sample. The maintained ``webdataset`` library supplies the
parts of the format a reader must agree on: its key rule (``base_plus_ext``) and its opener (``gopen``: local
paths, ``pipe:COMMAND``, ``http(s)://`` through curl, ``gs://``, ``ais://``, ``hf://``). Its pipeline's
splitting and shuffle buffer are not used: they cannot resume in the middle of an epoch (see
`stanvid.data.shard_order`, which is).

Shards are named by a brace pattern (``shards/{00000..00999}.tar``), a list of patterns, or a shard index:
a ``.json`` file in the format of webdataset's ``wids`` (``{"__kind__": "wids-shard-index-v1", "shardlist":
[{"url": ..., "nsamples": N}, ...]}``; relative URLs relative to the index), which `stanvid shard` writes
beside its shards. The order needs every shard's sample count: an index gives them; otherwise each local
shard's tar headers are read (no member data; cached per process), and a remote shard is streamed once.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stanvid.errors import DatasetError
from stanvid.fileio import atomic_write_text, read_regular_text

__all__ = [
    "SHARD_INDEX_KIND",
    "ShardList",
    "expand_shards",
    "is_remote",
    "is_shard_spec",
    "load_shards",
    "iter_samples",
    "count_samples",
    "sample_name",
    "verify_counts",
    "MAX_SAMPLE_BYTES",
    "write_shard_index",
]

SHARD_INDEX_KIND = "wids-shard-index-v1"
MAX_INDEX_BYTES = 256 << 20  # a shard index of 10^6 shards is ~60 MB
MAX_SAMPLES = 1 << 32  # per shard: video2dataset writes 10^3-10^4
MAX_HEADER_BYTES = 1 << 20  # a pax or GNU long-name header (names, times): kilobytes in real tars
_LONG_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK)  # fmt: skip
MAX_SAMPLE_BYTES = 128 << 20  # the members of one sample, by default (a WebVid sample is ~2.5 MB)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (skipped)


def is_remote(url: str) -> bool:
    """A ``pipe:`` command or a URL with a scheme other than ``file:`` (read by streaming only)."""
    return url.startswith("pipe:") or (
        re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) is not None and not url.startswith("file://")
    )


def is_shard_spec(spec: str | Sequence[str]) -> bool:
    """Whether a command-line argument names shards (a tar, a pattern of tars, a shard index, a remote URL)
    rather than a folder of videos."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return bool(specs) and all(
        is_remote(s) or re.search(r"\.tar(\.gz|\.bz2|\.xz)?\}?$", s) or s.endswith(".json") or "{" in s
        for s in specs
    )


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_shards(spec: str | Sequence[str], root: str | os.PathLike = ".") -> list[str]:
    """Every shard of a brace pattern (or list of them): local paths resolved against ``root``, ``pipe:``
    commands and URLs as written."""
    from braceexpand import braceexpand  # a dependency of webdataset

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for item in specs:
        for url in braceexpand(str(item).strip()):
            if not is_remote(url):
                path = Path(_local(url)).expanduser()
                url = str(path if path.is_absolute() else Path(root).expanduser() / path)
            urls.append(url)
    if not urls:
        raise DatasetError(f"no shards in {spec!r}")
    if len(set(urls)) != len(urls):
        twice = sorted({u for u in urls if urls.count(u) > 1})[:3]
        raise DatasetError(f"{spec!r} names some shards twice: {', '.join(twice)}")
    return urls


@dataclass(frozen=True)
class ShardList:
    """Shards and their sample counts, in the order given (the unshuffled order)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.urls) != len(self.counts) or not self.urls:
            raise DatasetError("a shard list needs one sample count per shard, and at least one shard")

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def describe(self) -> str:
        where = os.path.commonpath(self.urls) if not any(map(is_remote, self.urls)) else self.urls[0]
        low, high = min(self.counts), max(self.counts)
        return f"{len(self)} shards, {self.num_samples} samples ({low}-{high} per shard; {where})"


def load_shards(
    spec: str | Sequence[str], root: str | os.PathLike = ".", *, allow_pipe: bool = False
) -> ShardList:
    """The shards of ``spec`` (a pattern, a list, or a shard index ``.json``) with their sample counts.

    ``pipe:`` commands the caller wrote in ``spec`` are run; a shard index's ``pipe:`` URLs (a file's contents,
    perhaps downloaded) only with ``allow_pipe`` (see `read_shard_index`). A missing local shard, an unreadable
    one, or an index entry without ``nsamples`` raises `DatasetError` naming it."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if len(specs) == 1 and specs[0].endswith(".json") and not is_remote(specs[0]):
        path = Path(specs[0]).expanduser()
        path = path if path.is_absolute() else Path(root).expanduser() / path
        return read_shard_index(path, allow_pipe=allow_pipe)
    urls = expand_shards(specs, root)
    return ShardList(tuple(urls), tuple(count_samples(url) for url in urls))


PIPE_OPT_IN = "--allow-pipe (stanvid embed) or data.allow_pipe_urls: true (a recipe)"


def read_shard_index(path: Path, *, allow_pipe: bool = False) -> ShardList:
    """A wids shard index (see the module docstring); relative URLs are relative to its folder.

    An index is data, often downloaded beside a dataset: a ``pipe:`` URL in it would run a shell command its
    author wrote, so one is refused (naming the entry) unless ``allow_pipe`` says the user trusts the file.
    Other URLs are fetched by webdataset's fixed programs (curl, gsutil), the URL one argument, no shell."""
    try:
        data = json.loads(read_regular_text(path, MAX_INDEX_BYTES))
    except FileNotFoundError:
        raise DatasetError(f"shard index {path} does not exist") from None
    except (OSError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise DatasetError(f"{path}: not a readable shard index ({why})") from None
    entries = data.get("shardlist") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: a shard index needs a non-empty 'shardlist' of {{url, nsamples}}")
    urls, counts = [], []
    for i, entry in enumerate(entries):
        url = entry.get("url") if isinstance(entry, dict) else None
        n = entry.get("nsamples") if isinstance(entry, dict) else None
        if (
            not isinstance(url, str)
            or not isinstance(n, int)
            or isinstance(n, bool)
            or not 0 <= n <= MAX_SAMPLES
        ):
            raise DatasetError(
                f"{path}: shardlist[{i}] must be {{'url': str, 'nsamples': 0..{MAX_SAMPLES}}}, got {str(entry)[:200]}"
            )
        if url.startswith("pipe:") and not allow_pipe:
            raise DatasetError(
                f"{path}: shardlist[{i}] is a shell command ({url[:80]!r}); a shard index's pipe: URLs run only "
                f"when you trust the file and say so: {PIPE_OPT_IN}"
            )
        urls.append(url if is_remote(url) or os.path.isabs(_local(url)) else str(path.parent / _local(url)))
        counts.append(n)
    return ShardList(tuple(urls), tuple(counts))


def write_shard_index(path: str | os.PathLike, shards: ShardList) -> None:
    """Write the wids index of ``shards`` to ``path`` atomically (URLs relative to the index's folder when
    inside it)."""
    folder = Path(path).resolve().parent
    entries = []
    for url, n in zip(shards.urls, shards.counts, strict=True):
        if not is_remote(url) and Path(url).resolve().is_relative_to(folder):
            url = Path(url).resolve().relative_to(folder).as_posix()
        entries.append({"url": url, "nsamples": n})
    index = {"__kind__": SHARD_INDEX_KIND, "wids_version": 1, "shardlist": entries}
    atomic_write_text(path, json.dumps(index, indent=1) + "\n")


def sample_name(url: str, key: str) -> str:
    """How messages name a sample: its shard and key."""
    return f"{url}:{key}"


# ---- the members of a shard ----------------------------------------------------------------------------------


class _Keys:
    """Sample ordinals of a shard's member names, by webdataset's rules (see the module docstring)."""

    def __init__(self) -> None:
        from webdataset.tariterators import base_plus_ext

        self._split = base_plus_ext
        self.ordinal = -1
        self.key: str | None = None

    def member(self, info: tarfile.TarInfo) -> tuple[str, str] | None:
        """(key, field) of a member that belongs to a sample (advancing the ordinal on a new key), else None."""
        name = info.name
        if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
            return None
        if _META.match(name):
            return None
        key, field = self._split(name)
        if key is None:
            return None
        if key != self.key:
            self.key, self.ordinal = key, self.ordinal + 1
        return key, field.lower()


def tar_reader_info() -> type[tarfile.TarInfo]:
    """A `tarfile.TarInfo` class (pass it as ``tarinfo=``) that records how the tar's member list ended:
    ``ending`` is "end" after the end-of-archive zero block, "cut" when the data stopped at a member boundary
    or inside a header, "garbage" on a header that is not one. `tarfile` ends its iteration quietly on all
    three, so a shard cut between two members would otherwise pass as a shorter complete one."""

    class _Info(tarfile.TarInfo):
        ending = "cut"

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            try:
                info = super().frombuf(buf, encoding, errors)
                if info.type in _LONG_HEADERS and info.size > MAX_HEADER_BYTES:  # tarfile reads these whole
                    raise tarfile.ReadError(f"an extended header of {info.size:,} bytes")
                return info
            except tarfile.EOFHeaderError:
                _Info.ending = "end"
                raise
            except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
                _Info.ending = "cut"
                raise
            except tarfile.HeaderError:
                _Info.ending = "garbage"
                raise

    return _Info


def check_ending(url: str, info: type[tarfile.TarInfo], samples: int) -> None:
    """`DatasetError` naming the shard unless its member list ended with the tar end marker."""
    ending = getattr(info, "ending", "end")
    if ending != "end":
        what = "is cut short (no tar end marker)" if ending == "cut" else "holds a damaged tar header"
        raise DatasetError(f"shard {url} {what} after {samples} complete samples; write or download it again")


def verify_counts(shards: ShardList) -> None:
    """Check the sample count of every local shard against its tar (headers only, cached per process): an
    index that claims more or fewer samples than a shard holds is a `DatasetError` naming the shard, before
    any work is planned on it. ``pipe:``/URL shards are checked as they are streamed."""
    for url, n in zip(shards.urls, shards.counts, strict=True):
        if not is_remote(url) and (held := count_samples(url)) != n:
            raise DatasetError(f"shard {url} holds {held} samples, its index says {n}; count it again "
                               f"(stanvid shard --index)")  # fmt: skip


def _open(url: str):
    try:
        if not is_remote(url):
            return open(_local(url), "rb")  # noqa: SIM115 (closed by the caller)
        from webdataset import gopen

        return gopen(url, "rb")
    except FileNotFoundError:
        raise DatasetError(f"shard {url} does not exist (a missing shard stops the run)") from None
    except OSError as exc:
        raise DatasetError(f"shard {url}: cannot open ({exc.strerror or exc})") from None
    except ValueError as exc:  # webdataset: a scheme it has no opener for
        raise DatasetError(f"shard {url}: cannot open ({exc})") from None


def count_samples(url: str) -> int:
    """Samples in one shard, from its tar headers: a local file's are read with its member data skipped (cached
    per process, keyed on the file's size and modification time), a remote one is streamed once."""
    if is_remote(url):
        with _open(url) as stream:
            return _count(url, lambda info: tarfile.open(fileobj=stream, mode="r|*", tarinfo=info))
    path = _local(url)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"shard {url} does not exist (a missing shard stops the run)") from None
    return _count_local(os.path.realpath(path), st.st_size, st.st_mtime_ns, url)


@functools.lru_cache(maxsize=65536)
def _count_local(real: str, size: int, mtime_ns: int, url: str) -> int:
    # seekable: member data is skipped, not read
    return _count(url, lambda info: tarfile.open(real, mode="r:*", tarinfo=info))


def _count(url: str, open_tar: Callable[[type[tarfile.TarInfo]], tarfile.TarFile]) -> int:
    """The samples of the tar ``open_tar(tarinfo)`` opens, counted over its member headers; a tar without its
    end marker (cut at a member boundary) is a `DatasetError`, not a shorter count."""
    keys, info_class = _Keys(), tar_reader_info()
    try:
        with open_tar(info_class) as tar:
            for info in tar:
                keys.member(info)
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f" after sample {keys.ordinal}" if keys.ordinal >= 0 else ""
        raise DatasetError(f"shard {url}: not a readable tar file{where} ({exc})") from None
    check_ending(url, info_class, keys.ordinal + 1)
    return keys.ordinal + 1


def iter_samples(
    url: str, keep: Callable[[int], bool] | None = None, max_bytes: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(ordinal, sample)`` for the samples of a shard in order, ``sample`` a dict of field -> bytes with
    ``__key__`` and ``__url__``. ``keep(ordinal)`` False skips a sample without reading its members' data
    (a stream still reads past it). The shard is streamed (``r|*``), so pipes and URLs work as files do;
    a shard that ends early or is not a tar raises `DatasetError` naming it, and so does a sample whose
    members would hold more than ``max_bytes`` (default `MAX_SAMPLE_BYTES`), before any of it is read."""
    limit = MAX_SAMPLE_BYTES if max_bytes is None else max_bytes
    keys, info_class = _Keys(), tar_reader_info()
    current: dict[str, Any] | None = None
    ordinal, held = -1, 0
    with _open(url) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=info_class) as tar:
                for info in tar:
                    member = keys.member(info)
                    if member is None:
                        continue
                    if keys.ordinal != ordinal:
                        if current is not None:
                            yield ordinal, current
                        ordinal, current, held = keys.ordinal, None, 0
                        if keep is None or keep(ordinal):
                            current = {"__key__": member[0], "__url__": url}
                    if current is not None:
                        if member[1] in current:
                            raise DatasetError(
                                f"shard {url}: sample {member[0]} has two {member[1]!r} members"
                            )
                        held += info.size
                        check_sample_size(url, member[0], held, limit)
                        current[member[1]] = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"shard {url}: unreadable after sample {ordinal} ({exc})") from None
    check_ending(url, info_class, ordinal)  # the last sample may lack members: not yielded as complete
    if current is not None:
        yield ordinal, current


def check_sample_size(url: str, key: str, size: int, limit: int) -> None:
    """`DatasetError` naming the sample when its members hold more than ``limit`` bytes (a compressed shard's
    member can inflate a thousandfold: its header's size is known before a byte of it is inflated)."""
    if size > limit:
        raise DatasetError(
            f"{sample_name(url, key)}: its members hold {size:,} bytes, more than a sample may "
            f"({limit >> 20} MiB: data.max_sample_mb, stanvid embed --max-sample-mb)"
        )
