"""Queries beyond a text box: by image, by example clip, text and example combined, results grouped per file.

Every query becomes one L2-normalized vector in the index's embedding space, ranked by cosine similarity like
a text query:

* **text** — the text tower (`VideoIndex.embed_text`).
* **image** — the image as a *still clip*: the picture resized and centre-cropped as indexed frames are, repeated
  `num_frames` times and passed through `encode_video`. The still clip goes through the same temporal module
  as the indexed clips, so it lands where those vectors live; for a mean-pooled model it equals
  `encode_image` of the picture exactly (tests/test_query.py measures both on the demo's STAN model).
* **example clip** (`like`) — a video file, a span of it (`"clip.mp4:2.5-7"`, `"clip.mp4:1:05-1:20"`), or an
  indexed segment id (its stored vector, no decoding). A span is sampled and preprocessed exactly as the
  index samples a segment (`stanvid.search.index.read_clip`, through `VideoIndex.read_clip`), so an indexed span given back as an example scores 1.

**Combining** ("like this, but at night"): the parts given are each L2-normalized, summed with their weights
and normalized again,

    q = normalize(w_text * t + w_image * i + w_like * c),

so with the default weights of 1 each part pulls equally, and a larger weight makes one part dominate (a
weight of 0 drops it). Weights must be finite and non-negative and at least one part must carry weight.

**Grouping by file** (moments): `group_by="file"` returns the best `k` files, each with its best segment and
the score of every segment of that file (a timeline: where in the video the query matches), from the
stored embeddings.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from stanvid.errors import QueryError
from stanvid.search.rerank import keeps_frame_vectors, rerank
from stanvid.video.transforms import fit_frames

if TYPE_CHECKING:  # the index calls this module (`VideoIndex.search_image`), so the import is one-way
    from stanvid.search.index import SearchResult, VideoIndex

__all__ = [
    "GROUP_BY",
    "ClipSpec",
    "FileHit",
    "Query",
    "QueryError",
    "embed_clip",
    "embed_image",
    "embed_query",
    "load_image",
    "parse_like",
    "search",
]

GROUP_BY = (None, "file")
MAX_IMAGE_PIXELS = 50_000_000  # a decompression bomb is refused before it is decoded
MIN_IMAGE_SIDE = 4


@dataclass(frozen=True)
class ClipSpec:
    """An example clip: a video file (all of it, or [start, end) seconds), or an indexed segment by id."""

    path: str | None = None
    start: float | None = None
    end: float | None = None
    segment_id: int | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.segment_id is None):
            raise QueryError("an example clip is a video path or a segment id (exactly one of them)")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise QueryError(f"the example clip's {name} must be a non-negative number, got {value!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise QueryError(f"the example clip ends ({self.end} s) before it starts ({self.start} s)")


@dataclass(frozen=True)
class Query:
    """What to look for: any of text, image and example clip, with the weights of the combination."""

    text: str | None = None
    image: Any = None  # path, bytes, PIL image or (H, W, 3) uint8 array
    like: Any = None  # ClipSpec, "path[:START-END]", segment id (int)
    text_weight: float = 1.0
    image_weight: float = 1.0
    like_weight: float = 1.0

    def parts(self) -> list[tuple[str, float]]:
        """(part, weight) of the parts given; validates the weights."""
        given = [
            ("text", self.text is not None, self.text_weight),
            ("image", self.image is not None, self.image_weight),
            ("like", self.like is not None, self.like_weight),
        ]
        parts = []
        for name, present, weight in given:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise QueryError(f"{name}_weight must be a finite number, got {weight!r}")
            if weight < 0:
                raise QueryError(f"{name}_weight must not be negative, got {weight}")
            if present:
                parts.append((name, float(weight)))
        if not parts:
            raise QueryError("the query is empty: give a text, an image or an example clip")
        if not any(w > 0 for _, w in parts):
            raise QueryError("every part of the query has weight 0")
        return parts


@dataclass(frozen=True)
class FileHit:
    """A file's best segment and the score of each of its segments in time order (`timeline`)."""

    best: SearchResult
    timeline: list[dict[str, float]] = field(default_factory=list)  # {"id", "start", "end", "score"}

    def to_dict(self) -> dict[str, Any]:
        return {**self.best.to_dict(), "timeline": self.timeline}


# ---------------------------------------------------------------------------------------------- parsing
_SPAN = re.compile(r"(?P<start>[0-9:.]*)-(?P<end>[0-9:.]*)", re.ASCII)


def _seconds(text: str, spec: str) -> float | None:
    """ "75", "75.5", "1:15", "0:01:15.5" -> seconds; "" -> None."""
    if text == "":
        return None
    parts = text.split(":")
    try:
        if len(parts) > 3 or any(p == "" for p in parts):
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        raise QueryError(f"{spec!r}: {text!r} is not a time (seconds, m:ss or h:mm:ss)") from None
    return sum(v * 60**i for i, v in enumerate(reversed(values)))


def parse_like(spec: Any, root: str | os.PathLike | None = None) -> ClipSpec:
    """`ClipSpec` from what a user types: `"path"`, `"path:START-END"` (either end may be left out), a segment
    id (`123`, `"123"` or `"segment:123"`). A relative path that does not exist is also looked up under `root`
    (the indexed folder), so `"holiday/beach.mp4"` names an indexed file from anywhere."""
    if isinstance(spec, ClipSpec):
        return spec
    if isinstance(spec, bool):
        raise QueryError(f"an example clip is a path or a segment id, got {spec!r}")
    if isinstance(spec, int):
        return ClipSpec(segment_id=spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise QueryError(f"an example clip is a path or a segment id, got {type(spec).__name__}")
    text = os.fspath(spec)
    if not text.strip():
        raise QueryError("the example clip is empty: give a video path or a segment id")
    found = _existing(text, root)
    if found is not None:
        return ClipSpec(path=found)
    if m := re.fullmatch(r"(?:segment:)?(\d{1,18})", text.strip(), re.ASCII):
        return ClipSpec(segment_id=int(m.group(1)))
    # PATH:START-END, where the times may hold colons too (m:ss): the first split whose path exists wins
    spans = [(text[:i], m) for i, c in enumerate(text) if c == ":" and (m := _SPAN.fullmatch(text[i + 1 :]))]
    for head, m in spans:
        path = _existing(head, root)
        if path is not None:
            return ClipSpec(path, _seconds(m.group("start"), text), _seconds(m.group("end"), text))
    if spans:
        raise QueryError(f"{spans[0][0]}: no such video file")
    raise QueryError(f"{text}: no such video file (nor a segment id or PATH:START-END)")


def _existing(text: str, root: str | os.PathLike | None) -> str | None:
    for candidate in (Path(text).expanduser(), None if root is None else Path(root) / text):
        if candidate is not None and candidate.is_file():
            return str(candidate.resolve())
    return None


def load_image(source: Any) -> torch.Tensor:
    """An image as `(H, W, 3)` uint8 RGB (EXIF orientation applied) from a path, bytes, PIL image or array.

    Unreadable data, an unknown format or a picture over `MAX_IMAGE_PIXELS` raise `QueryError`."""
    if isinstance(source, torch.Tensor):
        source = source.numpy()
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise QueryError(f"an image array must be (H, W, 3) uint8, got {source.shape} {source.dtype}")
        if min(source.shape[:2]) < MIN_IMAGE_SIDE:
            raise QueryError(
                f"an image of {source.shape[1]}x{source.shape[0]} pixels is too small to search with"
            )
        return torch.from_numpy(np.ascontiguousarray(source))
    name = "the image"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not Path(name).is_file():
            raise QueryError(f"{name}: no such image file")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise QueryError("the image is empty (0 bytes)")
        source = io.BytesIO(bytes(source))
    elif not isinstance(source, Image.Image):
        raise QueryError(f"an image is a path, bytes, a PIL image or an array, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = source if isinstance(source, Image.Image) else Image.open(source)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise QueryError(
                    f"{name}: {img.width}x{img.height} pixels is more than the {MAX_IMAGE_PIXELS} allowed"
                )
            img = ImageOps.exif_transpose(img).convert("RGB")
            array = np.asarray(img, dtype=np.uint8)
    except QueryError:
        raise
    except UnidentifiedImageError:
        raise QueryError(f"{name}: not an image, or an image format Pillow cannot read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise QueryError(f"{name}: refused, too many pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise QueryError(f"{name}: cannot read the image ({exc})") from None
    if min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise QueryError(f"{name}: {array.shape[1]}x{array.shape[0]} pixels is too small to search with")
    return torch.from_numpy(array.copy())


# ---------------------------------------------------------------------------------------------- embedding
def embed_image(index: VideoIndex, image: Any) -> np.ndarray:
    """`(D,)` embedding of an image as a still clip (see the module docstring)."""
    cfg = index.model.config
    size = cfg.clip.vision.image_size
    frame = load_image(image)  # (H, W, 3)
    frame = fit_frames(frame[None], size, cfg.clip.preprocess.fit)  # (1, 3, S, S)
    still = frame.expand(cfg.num_frames, -1, -1, -1)[None].contiguous()  # (1, T, 3, S, S)
    return index.embed_clips(still)[0]


def embed_clip(index: VideoIndex, like: Any) -> np.ndarray:
    """`(D,)` embedding of an example clip (`ClipSpec` or what `parse_like` reads)."""
    spec = parse_like(like, index.root)
    if spec.segment_id is not None:
        with index.pinned() as view:
            if view.segment(spec.segment_id) is None:
                raise QueryError(f"{index.path}: no segment with id {spec.segment_id}")
            return view.segment_embeddings([spec.segment_id])[0]
    from stanvid.video.decode import probe

    info = probe(spec.path)
    start = 0.0 if spec.start is None else spec.start
    end = info.duration if spec.end is None else spec.end
    if start >= info.duration:
        raise QueryError(f"{spec.path}: starts at {start} s, after the video's end ({info.duration:.3f} s)")
    clip = index.read_clip(spec.path, start, min(end, info.duration))  # (T, 3, S, S)
    return index.embed_clips(clip[None])[0]


def embed_query(index: VideoIndex, query: Query) -> np.ndarray:
    """`(D,)` L2-normalized query vector: the weighted sum of the normalized parts, normalized."""
    total = np.zeros(index.meta["dim"], np.float64)
    parts = query.parts()
    scale = max(weight for _, weight in parts) or 1.0  # the result is normalized: only weight ratios matter,
    for name, weight in parts:  # and dividing by the largest keeps a huge weight (1e308) from overflowing
        weight = weight / scale
        if weight == 0:
            continue
        if name == "text":
            vec = index.embed_text([_text(query)])[0]
        elif name == "image":
            vec = embed_image(index, query.image)
        else:
            vec = embed_clip(index, query.like)
        total += weight * vec / max(np.linalg.norm(vec), 1e-12)
    norm = np.linalg.norm(total)
    if not norm > 1e-6:
        raise QueryError("the weighted parts of the query cancel out; change the weights")
    return (total / norm).astype(np.float32)


def _text(query: Query) -> str:
    if not isinstance(query.text, str) or not query.text.strip():
        raise QueryError("the query text is empty")
    return query.text


# ---------------------------------------------------------------------------------------------- searching
def search(
    index: VideoIndex,
    query: Query | str,
    k: int = 10,
    *,
    group_by: str | None = None,
    moments: bool = False,
    pad: float = 0.0,
    filters: Any = None,
    offset: int = 0,
) -> list[SearchResult] | list[FileHit]:
    """The `k` best segments for `query` (a `Query`, or a plain text), best first; with `group_by="file"`,
    the `k` best files (`FileHit`), each with its best segment first and the scores of all its segments;
    with `moments`, the `k` best moments, `pad` seconds wider each side (`stanvid.search.moments`).

    A text-only query to an index of a Mug-STAN model is ranked as `VideoIndex.search` ranks it: the Mug
    head re-ranks FAISS's nearest candidates (`stanvid.search.rerank`); any other query is one vector.
    `filters` (`stanvid.search.index.SearchFilter` or a mapping of its fields) keep only the files that pass,
    inside the vector search; `offset` skips the first hits (or files), for the next page."""
    if isinstance(query, str):
        query = Query(text=query)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QueryError(f"k must be a positive integer, got {k!r}")
    if group_by not in GROUP_BY:
        raise QueryError(f"group_by must be one of {', '.join(map(str, GROUP_BY))}, got {group_by!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise QueryError(f"offset must be a non-negative integer, got {offset!r}")
    with index.pinned() as view:  # the example segment, the hits and their files: one generation
        text_only = [name for name, weight in query.parts() if weight > 0] == ["text"]
        if group_by is None and text_only and not moments and keeps_frame_vectors(view.model):
            return rerank(view, _text(query), k, filters=filters, offset=offset)
        vector = embed_query(view, query)
        if moments:
            from stanvid.search.moments import search_moments

            return search_moments(view, vector, k, pad, filters=filters, offset=offset)
        if group_by is None:
            return view.search_embeddings(vector[None], k, filters=filters, offset=offset)[0]
        return group_by_file(view, vector, k, filters=filters, offset=offset)


def group_by_file(
    index: VideoIndex, vector: np.ndarray, k: int, *, filters: Any = None, offset: int = 0
) -> list[FileHit]:
    """The `k` files whose best segment scores highest, each with its timeline of segment scores.

    Candidates come from the vector index: the search widens (x4 each round) until `k` distinct files are
    found or every segment was returned, so `min(k, files)` files come back. The search and the timelines
    are read from one generation of the index (`VideoIndex.pinned`)."""
    with index.pinned() as view:
        return _group_by_file(view, vector, k + offset, filters)[offset:]


def _group_by_file(index: VideoIndex, vector: np.ndarray, k: int, filters: Any = None) -> list[FileHit]:
    want = min(len(index), max(4 * k, 32))
    best: dict[int, SearchResult] = {}
    while want > 0:
        hits = index.search_embeddings(vector[None], want, filters=filters)[0]
        best = {}
        for hit in hits:
            best.setdefault(hit.file_id, hit)
        if len(best) >= k or want >= len(index) or len(hits) < want:  # every passing segment seen
            break
        want = min(len(index), want * 4)
    out = []
    for hit in list(best.values())[:k]:
        segs, emb = index.file_segments(hit.file_id)  # (n,), (n, D)
        scores = emb @ vector  # (n,)
        timeline = [
            {"id": s.id, "start": s.start, "end": s.end, "score": float(v)}
            for s, v in zip(segs, scores, strict=True)
        ]
        out.append(FileHit(hit, timeline))
    return out


def to_dicts(results: list[SearchResult] | list[FileHit]) -> list[dict[str, Any]]:
    """JSON-ready rows of either kind of result."""
    return [r.to_dict() if isinstance(r, FileHit) else asdict(r) for r in results]
