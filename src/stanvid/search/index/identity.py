"""Which model built an index: its fingerprint (config and weights), its source as recorded, and the check
that refuses to mix two models, folders or segmentations in one index.

The fingerprint hashes every weight (0.76 GB for ViT-B/32 + STAN: about half a second, a second under load),
and every `stanvid index` run and every first text query computes it. A model loaded from a source whose
weights file is exactly its state dict (a stanvid folder, as saved; `load_model_and_weights`) is fingerprinted
once per version of that file: `load_fingerprinted` keeps the digest in `$STANVID_CACHE/fingerprints.json`
under the file's settled identity (device, inode, size, mtime and ctime: `stanvid.fileio.settled_identity`),
its real path and the hash of the config the fingerprint covers. Any change to the file (rewritten, replaced,
copied over, touched) changes that identity, so a stale entry is never found; a file changed less than two
seconds before it was read is not cached at all (a second change within the clock tick of the first could
keep all five); an unreadable or corrupt cache file counts as empty. A model passed in memory is always hashed:
nothing says its weights are still a file's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from stanvid.checkpoints.download import cache_dir
from stanvid.checkpoints.fingerprint import fingerprinted_config, model_fingerprint
from stanvid.errors import VideoIndexError
from stanvid.fileio import atomic_write_text
from stanvid.models.video_clip import VideoCLIP
from stanvid.search.index.store import FORMAT_VERSION

log = logging.getLogger("stanvid")


# ---------------------------------------------------------------------------------------------- the cache
FINGERPRINT_CACHE = "fingerprints.json"
_CACHE_ENTRIES = 256  # the oldest entries go first: a cache of what this machine loads, not an archive
_SCHEME = 1  # what `model_fingerprint` hashes; a change to it must change this, so old entries are not found


def load_fingerprinted(
    source: str, overrides: dict[str, Any], runtime: str | None = None
) -> tuple[VideoCLIP, str]:
    """`load_model(source, runtime=runtime, **overrides)` and its `model_fingerprint`, from the cache when the
    weights file is the one fingerprinted before (module docstring)."""
    from stanvid.checkpoints.load import load_model_and_weights

    model, weights = load_model_and_weights(source, runtime=runtime, **overrides)
    if weights is None:
        return model, model_fingerprint(model)
    key = _cache_key(model, weights.path, weights.identity)
    path = cache_dir() / FINGERPRINT_CACHE
    entries = _read_cache(path)
    found = entries.get(key)
    if found is not None:
        return model, found
    fingerprint = entries[key] = model_fingerprint(model)
    _write_cache(path, dict(list(entries.items())[-_CACHE_ENTRIES:]))
    return model, fingerprint


def _cache_key(model: VideoCLIP, weights: Path, identity: list[int]) -> str:
    config = hashlib.sha256(fingerprinted_config(model).encode()).hexdigest()
    return hashlib.sha256(
        json.dumps([_SCHEME, os.path.realpath(weights), identity, config]).encode()
    ).hexdigest()


def _read_cache(path: Path) -> dict[str, str]:
    """The cache's entries; an absent, unreadable or malformed file (or entry) counts as none."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    entries = raw.get("entries") if isinstance(raw, dict) and raw.get("version") == _SCHEME else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, str) and len(v) == 64 and _is_hex(v)}


def _write_cache(path: Path, entries: dict[str, str]) -> None:
    """Written atomically; a cache that cannot be written (read-only home, full disk) is only not kept."""
    try:
        atomic_write_text(path, json.dumps({"version": _SCHEME, "entries": entries}) + "\n")
    except OSError as exc:
        log.debug("%s: fingerprint cache not written (%s)", path, exc)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _source_string(source: str | os.PathLike) -> str:
    """A local checkpoint as its absolute path (so queries work from any directory), anything else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _check_identity(meta: dict[str, Any], identity: dict[str, Any], out: Path) -> None:
    """Refuse to mix embeddings of two models, two folders or two segmentations in one index."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise VideoIndexError(
            f"{out}: index format {meta.get('format_version')} is not {FORMAT_VERSION}; rebuild it"
        )
    if meta["model_fingerprint"] != identity["model_fingerprint"]:
        raise VideoIndexError(
            f"{out}: the index was built with another model ({meta['model_source'] or 'in-memory model'}, "
            f"fingerprint {meta['model_fingerprint'][:12]}), this one has fingerprint "
            f"{identity['model_fingerprint'][:12]}; use the same model or write a new index (another --out)"
        )
    for key, what in (("root", "folder"), ("segment_seconds", "segment length")):
        if meta[key] != identity[key]:
            name = (lambda v: f"folder {v!r}") if key == "root" else describe_segments
            was, now = name(meta[key]), name(identity[key])
            raise VideoIndexError(
                f"{out}: the index was built with {was}, not {now}; "
                f"use the same {what} or write a new index (another --out)"
            )


def describe_segments(seconds: float | None) -> str:
    """How messages name a segmentation: never "None" for a number."""
    return "whole videos (no --segment-seconds)" if seconds is None else f"segments of {seconds:g} s"
