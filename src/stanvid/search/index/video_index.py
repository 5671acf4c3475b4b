"""An open index: text, image and clip search, segment lookups, and the indexed files handed out only while
they still are the files indexed; following the index on disk as runs update it.

Every answer comes from one generation (`stanvid.search.index.snapshot`): a call acquires the snapshot
current when it starts and reads everything through it, and `pinned()` holds one snapshot across several
calls (the server pins one per request). New committed states are loaded off the request path and swapped
in (`stanvid.search.index.follow`)."""

from __future__ import annotations

import bisect
import contextlib
import copy
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from stanvid.distributed import default_device
from stanvid.errors import IndexedFileError, VideoIndexError
from stanvid.models.video_clip import VideoCLIP
from stanvid.precision import InferencePrecision, prepare_for_inference, resolve_precision
from stanvid.search.index.ann import describe, search_allowed
from stanvid.search.index.clips import encode_clips, read_clip
from stanvid.search.index.filters import SearchFilter, allowed_rows, check_offset, filterable, parse_filters
from stanvid.search.index.follow import FOLLOW_SECONDS, Follower
from stanvid.search.index.identity import load_fingerprinted, model_fingerprint
from stanvid.search.index.records import SearchResult, Segment
from stanvid.search.index.snapshot import Snapshot
from stanvid.search.index.store import _REPAIR, DB_NAME
from stanvid.search.index.vectors import VectorStore
from stanvid.search.rerank import blob_frames, keeps_frame_vectors, rerank
from stanvid.video.folders import is_inside

log = logging.getLogger("stanvid")

_SEGMENT_COLUMNS = (
    "s.id, f.id, f.path, s.start, s.end, f.fps, f.num_frames, f.width, f.height, f.size, f.mtime_ns"
)


@dataclass
class _Models:
    """The query model of an open index and what it runs with, shared by the index and its pinned views."""

    model: VideoCLIP | None = None
    runner: InferencePrecision | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)


class VideoIndex:
    """An open index: text search, segment lookup and frames for thumbnails. Thread-safe.

    The query model is loaded on first use (`model`), from the recorded source unless one is passed, and its
    fingerprint must match the one recorded at build time. Queries are encoded at `precision`
    (`stanvid.precision`), which need not be the one the index was built with (`build_precision`).

    The index follows runs that update it (`stanvid index` again on its folder): every `follow` seconds at
    most, a call checks the committed state (one SQLite read) and, when a run has committed since, the new
    state is loaded in a background thread and swapped in; calls answer from the previous one until then.
    `refresh()` moves now; `watch()` checks in a thread of its own, so an update is in place before the next
    call; `follow=None` keeps the generation opened until `refresh()`. Each call answers from one
    generation, and `pinned()` holds one across calls (see `stanvid.search.index.follow`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: VideoCLIP | None = None,
        device: str | None = None,
        precision: str = "auto",
        follow: float | None = FOLLOW_SECONDS,
        runtime: str | None = None,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.db = db = self.path / DB_NAME
        if not db.is_file():
            raise VideoIndexError(
                f"{path}: no index here ({DB_NAME} missing); build one with `stanvid index`"
            )
        self._follower = Follower(self.path, db, follow)
        self._pin: Snapshot | None = None  # set on a pinned view: every call answers from it
        try:
            self.root = Path(self.meta["root"])
            self.device = torch.device(device) if device else default_device()
            self.precision = resolve_precision(precision, self.device)
            self.runtime = runtime
            self._models = _Models()
            if model is not None:
                self._models.model = self._verified(model)
        except BaseException:
            self._follower.close()
            raise

    @property
    def build_precision(self) -> str:
        """The precision(s) the stored embeddings were computed in ("fp32", or "fp32+bf16" after mixed runs)."""
        return "+".join(self.meta.get("precisions", [])) or "fp32"  # indexes from before precisions were kept

    # -------------------------------------------------------------- model
    @property
    def model(self) -> VideoCLIP:
        models = self._models
        with models.lock:
            if models.model is None:
                source = self.meta["model_source"]
                if not source:
                    raise VideoIndexError(
                        f"{self.path}: the index was built from an in-memory model; pass it: open_index(path, model=...)"
                    )
                models.model = self._verified(
                    *load_fingerprinted(source, self.meta["model_overrides"], self.runtime)
                )
            return models.model

    def _verified(self, model: VideoCLIP, found: str | None = None) -> VideoCLIP:
        found = found or model_fingerprint(model)
        if found != self.meta["model_fingerprint"]:
            raise VideoIndexError(
                f"{self.path}: the query model (fingerprint {found[:12]}) is not the model that built the index "
                f"({self.meta['model_source'] or 'in-memory model'}, fingerprint "
                f"{self.meta['model_fingerprint'][:12]}); its text embeddings would not match the video embeddings"
            )
        return model.eval().to(self.device)

    # -------------------------------------------------------------- generations
    @property
    def _snapshot(self) -> Snapshot:
        """The snapshot this index answers from now (for reading its immutable parts: meta, counts)."""
        return self._pin if self._pin is not None else self._follower.current

    @contextlib.contextmanager
    def _use(self) -> Iterator[Snapshot]:
        """The snapshot one call answers from, held for the call."""
        if self._pin is not None:
            yield self._pin
            return
        snap = self._follower.acquire()
        try:
            yield snap
        finally:
            snap.release()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[VideoIndex]:
        """A view of this index that answers every call from the generation current now, until the block
        ends (a swap meanwhile does not reach it): for answers made of several calls, such as a search and
        the segments and files of its hits. The view shares the model; inside a view this is the view."""
        if self._pin is not None:
            yield self
            return
        with self._use() as snap:
            view = copy.copy(self)
            view._pin = snap
            yield view

    @property
    def meta(self) -> dict[str, Any]:
        """The index record of the generation answered from (identity, settings, vector index record)."""
        return self._snapshot.meta

    @property
    def vectors(self) -> Any:
        """The searcher of the generation answered from (`stanvid.search.index.ann`)."""
        return self._snapshot.searcher

    @property
    def store(self) -> VectorStore:
        return self._snapshot.store

    @property
    def generation(self) -> int:
        """The generation this index answers from (bumped by every commit that changes the rows)."""
        return self._snapshot.generation

    def committed_generation(self) -> int:
        """The generation committed on disk now: one SQLite read; it differs from `generation` while an
        update is being loaded (or was refused, see `refresh`)."""
        return self._follower.committed_generation()

    def refresh(self) -> bool:
        """Move to the committed state now, loading it in this thread: True when it was newer. A state that
        cannot be loaded (say, a damaged vector index file) raises `VideoIndexError`, and the index keeps
        answering from the generation it has. On a pinned view the view stays where it is."""
        return self._follower.refresh()

    def watch(self, interval: float | None = None) -> None:
        """Check for an update every `interval` seconds (default: `follow`'s) in a background thread, which
        loads it there: an update is in place before the next call (what `stanvid serve` runs). `close`
        stops it."""
        self._follower.watch(interval)

    def stop_watching(self) -> None:
        """Stop the thread `watch` started (the index checks on use again, every `follow` seconds)."""
        self._follower.stop_watching()

    def describe(self) -> str:
        """The vector index in one line: kind, parameters and the recall measured when it was built."""
        snap = self._snapshot
        return describe(snap.meta.get("ann")) if snap.searcher.kind != "scan" else "exact scan of the store"

    def __len__(self) -> int:
        """Number of segments searched."""
        return self._snapshot.segments

    def num_files(self) -> int:
        """Number of files indexed, in the generation answered from."""
        return self._snapshot.files

    @property
    def model_name(self) -> str:
        """The model by its name, not where it lies on this machine: a local checkpoint by its last two path
        components (`stanvid-demo/model`, as a hub id reads: a bare `model` said nothing), a hub id or OpenAI
        name as given; "" for an in-memory model."""
        source = self.meta["model_source"]
        if not (source and Path(source).is_absolute()):
            return source
        return "/".join(Path(source).parts[1:][-2:])

    # -------------------------------------------------------------- search
    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, D) float32, L2-normalized, with the index's model."""
        model = self.model
        with self._models.lock:
            runner = self._inference()
            ids = model.tokenize(list(texts)).to(self.device)
            with runner.autocast():
                emb = runner.model.encode_text(ids)  # (N, D)
            emb = F.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()

    def _inference(self) -> InferencePrecision:
        """The query model prepared for the index's query precision (made once; call under the model lock)."""
        if self._models.runner is None:
            self._models.runner = prepare_for_inference(self.model, self.precision, self.device)
        return self._models.runner

    @torch.inference_mode()
    def embed_text_tokens(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) strings -> per-token features (N, L, D) float32 and their mask (N, L), L = max(length, longest
        caption), on the CPU, with the index's model (for the Mug head's re-ranking)."""
        model = self.model
        with self._models.lock:
            ids = model.tokenize(list(texts))
            used = int((ids != 0).sum(dim=1).max())
            ids = ids[:, : max(min(length, ids.shape[1]), used)].to(self.device)
            tokens = model.encode_text(ids, pool=False).float()  # (N, L, D)
        return tokens.cpu(), (ids != 0).cpu()

    def segment_frames(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Per-frame vectors (T, D) float32 of segments by id, for indexes built by a Mug-STAN model."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._use() as snap:
            rows = snap.rows(
                f"SELECT segment_id, frames FROM segment_frames WHERE segment_id IN ({marks})",
                [int(i) for i in ids],
            )
        return {
            sid: blob_frames(blob, self.meta["dim"], where=f"{self.path}: segment {sid}")
            for sid, blob in rows
        }

    def search(
        self,
        text: str,
        k: int = 10,
        *,
        moments: bool = False,
        pad: float = 0.0,
        filters: SearchFilter | dict | None = None,
        offset: int = 0,
    ) -> list[SearchResult]:
        """The `k` segments most similar to `text`, best first (past the first `offset`, among the segments of
        the files that pass `filters`: `stanvid.search.index.filters`); with `moments`, the `k` best moments:
        each hit's `start` and `end` bound what the text describes (`pad` seconds wider each side), see
        `stanvid.search.moments`.

        With a Mug-STAN model (`similarity: mug`), FAISS's nearest candidates by pooled cosine are re-ranked by
        the Mug head on their per-frame vectors (`stanvid.search.rerank.rerank`); scores are then the head's."""
        if not isinstance(text, str) or not text.strip():
            raise VideoIndexError("the query text is empty")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VideoIndexError(f"k must be a positive integer, got {k!r}")
        with self.pinned() as view:
            if moments:
                from stanvid.search.moments import search_moments

                return search_moments(
                    view, view.embed_text([text])[0], k, pad, filters=filters, offset=offset
                )
            if keeps_frame_vectors(view.model):
                return rerank(view, text, k, filters=filters, offset=offset)
            return view.search_embeddings(view.embed_text([text]), k, filters=filters, offset=offset)[0]

    def search_embeddings(
        self, queries: np.ndarray, k: int = 10, *, filters: SearchFilter | dict | None = None, offset: int = 0
    ) -> list[list[SearchResult]]:
        """Nearest segments for each (D,) row of `queries` (L2-normalized), best first: `min(k, len(self))`
        of them, the segments of one generation. `filters` (a `SearchFilter` or a mapping of its fields)
        applies inside the vector search; `offset` skips the first hits (pages are stable in a generation)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta["dim"])
        spec, offset = parse_filters(filters), check_offset(offset)
        with self._use() as snap:
            if snap.segments == 0:
                return [[] for _ in range(len(queries))]
            allowed = allowed_rows(snap, spec, str(self.path))
            want = min(offset + k, snap.segments)
            scores, slots = search_allowed(snap.searcher, snap.store, queries, want, allowed)  # (Q, k) each
            scores, slots = scores[:, offset:], slots[:, offset:]
            found = self._by_slot(snap, sorted({int(i) for i in slots.ravel() if i >= 0}))
        results = []
        for row_scores, row_slots in zip(scores, slots, strict=True):
            results.append(
                [
                    SearchResult(seg.id, seg.file_id, seg.path, seg.relpath, seg.start, seg.end, float(score))
                    for score, i in zip(row_scores, row_slots, strict=True)
                    if (seg := found.get(int(i))) is not None
                ]
            )
        return results

    def _by_slot(self, snap: Snapshot, slots: Sequence[int]) -> dict[int, Segment]:
        """The segments at store slots, in `snap`'s generation (where each slot found is some segment's)."""
        if not slots:
            return {}
        marks = ",".join("?" * len(slots))
        rows = snap.rows(
            f"SELECT s.slot, {_SEGMENT_COLUMNS} FROM segments s JOIN files f ON f.id = s.file_id "
            f"WHERE s.slot IN ({marks})",
            slots,
        )
        found = {slot: self._segment(rest) for slot, *rest in rows}
        if len(found) != len(slots):  # the searcher and the rows are one generation: never, unless damaged
            lost = sorted(set(slots) - set(found))
            raise VideoIndexError(f"{self.db}: store slots {lost[:5]} are no segment's (damaged); {_REPAIR}")
        return found

    def _segment(self, row: Sequence[Any]) -> Segment:
        sid, fid, rel, *rest = row
        return Segment(sid, fid, str(self.root / rel), rel, *rest)

    def read_clip(self, path: str | os.PathLike, start: float, end: float) -> torch.Tensor:
        """The clip this index's model embeds for [start, end) seconds of a video, `(T, 3, S, S)` uint8: sampled
        as an indexed segment is (`stanvid.search.index.read_clip`), so an indexed span given back embeds identically."""
        cfg = self.model.config
        return read_clip(
            path,
            start,
            end,
            clip_len=cfg.num_frames,
            image_size=cfg.clip.vision.image_size,
            fit=cfg.clip.preprocess.fit,
        )

    def embed_clips(self, clips: torch.Tensor) -> np.ndarray:
        """`(n, T, 3, S, S)` uint8 clips (see `read_clip`) -> `(n, D)` L2-normalized, with the index's model."""
        model = self.model
        with self._models.lock:
            return encode_clips(model, clips, self.device, runner=self._inference())

    def search_image(self, image: Any, k: int = 10, *, filters: SearchFilter | dict | None = None,
                     offset: int = 0, **query: Any) -> list[SearchResult]:  # fmt: skip
        """Segments most similar to an image (path, bytes, PIL image or (H, W, 3) uint8 array); `query` takes
        the other fields of `stanvid.search.query.Query` (text, weights). See `stanvid.search.query`."""
        from stanvid.search.query import Query, search

        return search(self, Query(image=image, **query), k, filters=filters, offset=offset)

    def search_video(self, like: Any, k: int = 10, *, filters: SearchFilter | dict | None = None,
                     offset: int = 0, **query: Any) -> list[SearchResult]:  # fmt: skip
        """Segments most similar to an example clip: `"file.mp4"`, `"file.mp4:START-END"` (seconds), a segment
        id (int) or a `stanvid.search.query.ClipSpec`; `query` as in `search_image`."""
        from stanvid.search.query import Query, search

        return search(self, Query(like=like, **query), k, filters=filters, offset=offset)

    def query(self, query: Any, k: int = 10, *, group_by: str | None = None, moments: bool = False,
              pad: float = 0.0, filters: SearchFilter | dict | None = None, offset: int = 0) -> list:  # fmt: skip
        """The `k` best segments for a `stanvid.Query` (text, image, example clip and their weights) or a plain
        text; with `group_by="file"`, the `k` best files (`stanvid.FileHit`); with `moments`, the `k` best
        moments (`pad` seconds wider each side). `filters` and `offset` as in `search_embeddings`. See
        `stanvid.search.query.search`."""
        from stanvid.search.query import search

        return search(
            self, query, k, group_by=group_by, moments=moments, pad=pad, filters=filters, offset=offset
        )

    # -------------------------------------------------------------- moments
    def moment_features(self, file_ids: Sequence[int]) -> dict[int, tuple[float, float, np.ndarray]]:
        """file id -> (step, duration, `(n, D)` float16 moment features) of the files that have them
        (`stanvid.search.index.moment_store`); files indexed without them are left out."""
        from stanvid.search.index.moment_store import TABLE, decode, has_table

        if not file_ids:
            return {}
        marks = ",".join("?" * len(file_ids))
        with self._use() as snap:
            if not has_table(snap.rows):
                return {}
            rows = snap.rows(
                f"SELECT m.file_id, f.duration, m.step, m.count, m.dim, m.features FROM {TABLE} m "
                f"JOIN files f ON f.id = m.file_id WHERE m.file_id IN ({marks})",
                [int(i) for i in file_ids],
            )
        return {
            fid: (step, duration, decode((step, count, dim, blob), where=f"{self.db}: file {fid}"))
            for fid, duration, step, count, dim, blob in rows
        }

    def files(self) -> list[tuple[int, str]]:
        """(id, path relative to the folder) of every indexed file, by path."""
        with self._use() as snap:
            return [(fid, rel) for fid, rel in snap.rows("SELECT id, path FROM files ORDER BY path")]

    def file_durations(self, file_ids: Sequence[int]) -> dict[int, float]:
        """file id -> duration in seconds, for the ids the index has."""
        if not file_ids:
            return {}
        marks = ",".join("?" * len(file_ids))
        with self._use() as snap:
            rows = snap.rows(
                f"SELECT id, duration FROM files WHERE id IN ({marks})", [int(i) for i in file_ids]
            )
        return dict(rows)

    def segments_at(self, moments: Sequence[tuple[int, float]]) -> dict[tuple[int, float], int]:
        """(file id, seconds) -> the id of the segment of that file that holds that time (its first one before
        its start, its last one past its end), in one read."""
        if not moments:
            return {}
        fids = sorted({int(f) for f, _ in moments})
        marks = ",".join("?" * len(fids))
        with self._use() as snap:
            rows = snap.rows(
                f"SELECT file_id, start, id FROM segments WHERE file_id IN ({marks}) ORDER BY file_id, start",
                fids,
            )
        by_file: dict[int, tuple[list[float], list[int]]] = {}
        for fid, start, sid in rows:
            starts, ids = by_file.setdefault(fid, ([], []))
            starts.append(start)
            ids.append(sid)
        out = {}
        for fid, t in moments:
            if fid in by_file:
                starts, ids = by_file[fid]
                out[(fid, t)] = ids[max(0, bisect.bisect_right(starts, t) - 1)]
        return out

    def moments_note(self) -> str:
        """ "" when every file has moment features; else one line saying why (some) hits of a moments search
        are the index's fixed segments (`stanvid.search.moments.missing_moments`)."""
        from stanvid.search.index.moment_store import TABLE, has_table
        from stanvid.search.moments import missing_moments

        with self._use() as snap:
            kept = snap.rows(f"SELECT COUNT(*) FROM {TABLE}")[0][0] if has_table(snap.rows) else None
            return missing_moments(str(self.path), kept, snap.files)

    def duplicates(self, threshold: float | None = None, *, min_fraction: float | None = None) -> list:
        """Groups of files that hold the same footage (`stanvid.search.duplicates.CopyGroup`), largest first,
        from the stored embeddings; `threshold` (segment cosine) and `min_fraction` (of the shorter file
        lined up) default to the measured ones. See `stanvid.search.duplicates`."""
        from stanvid.search import duplicates as dup

        return dup.find_duplicates(self, dup.DEFAULT_THRESHOLD if threshold is None else threshold,
                                   min_fraction=dup.MIN_FRACTION if min_fraction is None else min_fraction)  # fmt: skip

    def copies(self, file_id: int, threshold: float | None = None) -> list:
        """The files that hold footage of file `file_id` (`stanvid.search.duplicates.CopyMatch`), best first."""
        from stanvid.search import duplicates as dup

        return dup.find_copies(self, file_id, dup.DEFAULT_THRESHOLD if threshold is None else threshold)

    def filterable(self) -> tuple[list[str], dict[str, str]]:
        """The filter fields this generation can apply, and those it cannot, with the reason (an index built
        before container metadata was recorded cannot filter on it)."""
        with self._use() as snap:
            return filterable(snap)

    # -------------------------------------------------------------- lookups
    def segment_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """`(len(ids), D)` stored embeddings, in the order of `ids`; an unknown id raises `VideoIndexError`."""
        dim = self.meta["dim"]
        if not ids:
            return np.zeros((0, dim), np.float32)
        marks = ",".join("?" * len(ids))
        with self._use() as snap:
            rows = dict(
                snap.rows(f"SELECT id, slot FROM segments WHERE id IN ({marks})", [int(i) for i in ids])
            )
            missing = [int(i) for i in ids if int(i) not in rows]
            if missing:
                raise VideoIndexError(f"{self.path}: no segment with id {missing[0]}")
            return snap.store.read(np.array([rows[int(i)] for i in ids], dtype=np.int64))

    def all_segments(self) -> tuple[list[Segment], np.ndarray]:
        """Every segment, ordered by file path and start time, with its `(N, D)` stored embedding (all in
        memory: `iter_segments` streams them)."""
        segs, parts = [], []
        for batch, vectors in self.iter_segments():
            segs += batch
            parts.append(vectors)
        return segs, np.concatenate(parts) if parts else np.zeros((0, self.meta["dim"]), np.float32)

    def iter_segments(self, batch: int = 65_536) -> Iterator[tuple[list[Segment], np.ndarray]]:
        """(segments, `(n, D)` embeddings) in batches of `batch`, ordered by file path and start time: the
        whole index of one generation without holding it in memory (read a page of files at a time, so the
        other calls on the index are not held up meanwhile)."""
        with self.pinned() as view:
            snap, after, pending = view._pin, "", []
            while True:
                files = snap.rows(
                    "SELECT id, path FROM files WHERE path > ? ORDER BY path LIMIT 1024", (after,)
                )
                if files:
                    after = files[-1][1]
                    marks = ",".join("?" * len(files))
                    rows = snap.rows(
                        f"SELECT s.slot, {_SEGMENT_COLUMNS} FROM segments s JOIN files f ON f.id = s.file_id "
                        f"WHERE s.file_id IN ({marks}) ORDER BY f.path, s.start",
                        [fid for fid, _ in files],
                    )
                    pending += rows
                while pending and (len(pending) >= batch or not files):
                    chunk, pending = pending[:batch], pending[batch:]
                    slots = np.array([r[0] for r in chunk], dtype=np.int64)
                    yield [self._segment(r[1:]) for r in chunk], snap.store.read(slots)
                if not files:
                    return

    def file_segments(self, file_id: int) -> tuple[list[Segment], np.ndarray]:
        """All segments of one file in time order, with their `(n, D)` stored embeddings."""
        with self._use() as snap:
            rows = snap.rows(
                f"SELECT s.slot, {_SEGMENT_COLUMNS} FROM segments s JOIN files f ON f.id = s.file_id "
                "WHERE s.file_id = ? ORDER BY s.start",
                (int(file_id),),
            )
            return [self._segment(r[1:]) for r in rows], snap.store.read(
                np.array([r[0] for r in rows], dtype=np.int64)
            )

    def segments(self, ids: Sequence[int]) -> list[Segment]:
        """Segment rows by id (unknown ids are left out)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._use() as snap:
            rows = snap.rows(
                f"SELECT {_SEGMENT_COLUMNS} FROM segments s JOIN files f ON f.id = s.file_id WHERE s.id IN ({marks})",
                [int(i) for i in ids],
            )
        return [self._segment(r) for r in rows]

    def segment(self, segment_id: int) -> Segment | None:
        found = self.segments([segment_id])
        return found[0] if found else None

    def file_path(self, file_id: int) -> Path | None:
        """Absolute path of an indexed file by id; None for an id the index does not have."""
        with self._use() as snap:
            rows = snap.rows("SELECT path FROM files WHERE id = ?", (int(file_id),))
        return None if not rows else self.root / rows[0][0]

    def file_relpath(self, file_id: int) -> str | None:
        """Path of an indexed file relative to the indexed folder; None for an unknown id."""
        path = self.file_path(file_id)
        return None if path is None else path.relative_to(self.root).as_posix()

    def open_video(self, file_id: int) -> tuple[BinaryIO, os.stat_result, str] | None:
        """The indexed file `file_id` opened for reading, with its `fstat` and its path relative to the folder,
        if it still is the file indexed; None for an id the index does not have.

        Raises `IndexedFileError` (message relative to the folder) when it is gone, or when it is no longer
        what was indexed: its real path (symbolic links resolved at this moment) leaves the folder, it is not
        a regular file, or its size, mtime, device or inode differ. The checks are made on the opened
        descriptor, so the bytes read from it are those of the checked file whatever is renamed afterwards.
        """
        with self._use() as snap:
            rows = snap.rows(
                "SELECT path, size, mtime_ns, device, inode FROM files WHERE id = ?", (int(file_id),)
            )
        if not rows:
            return None
        relpath, size, mtime_ns, device, inode = rows[0]
        name = f"file {file_id} ({relpath})"
        changed = f"{name} is no longer the file that was indexed"
        real = Path(os.path.realpath(self.root / relpath))
        if not is_inside(real, self.root):
            raise IndexedFileError(f"{changed}: it now resolves outside the indexed folder", gone=False)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no FIFO waits
        try:
            fd = os.open(real, flags)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise IndexedFileError(f"{name} is gone from the server", gone=True) from exc
        except OSError as exc:
            raise IndexedFileError(f"{changed} ({exc.strerror})", gone=False) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise IndexedFileError(f"{changed}: it is now {kind}", gone=False)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) or (
                inode is not None and (st.st_dev, st.st_ino) != (device, inode)
            ):
                raise IndexedFileError(
                    f"{changed}: it was modified or replaced; re-run `stanvid index`", gone=False
                )
            return os.fdopen(fd, "rb"), st, relpath
        except BaseException:
            os.close(fd)
            raise

    def middle_frame(self, segment_id: int, size: int | None = None) -> torch.Tensor:
        """The frame shown at the middle of a segment, (H, W, 3) uint8, its shortest side shrunk to `size`
        when it is larger (never enlarged)."""
        with self.pinned() as view:
            return view._middle_frame(segment_id, size)

    def _middle_frame(self, segment_id: int, size: int | None) -> torch.Tensor:
        from stanvid.video.decode import read_frames

        seg = self.segment(segment_id)
        if seg is None:
            raise VideoIndexError(f"{self.path}: no segment with id {segment_id}")
        fps, frames, short = seg.fps, seg.num_frames, min(seg.width, seg.height)
        if frames <= 0 or fps <= 0:  # imported from embeddings: the file was never probed here
            from stanvid.video.decode import probe

            self._check_file(seg.file_id)
            info = probe(os.path.realpath(seg.path))
            fps, frames, short = info.fps, info.num_frames, min(info.width, info.height)
        frame = min(frames - 1, max(0, int((seg.start + seg.end) / 2 * fps)))
        shrink = size if size is not None and size < short else None
        self._check_file(seg.file_id)  # still the indexed file, before and after decoding (see open_video)
        image = read_frames(os.path.realpath(seg.path), [frame], size=shrink)[0]
        self._check_file(seg.file_id)
        return image

    def _check_file(self, file_id: int) -> None:
        opened = self.open_video(file_id)
        if opened is None:
            raise VideoIndexError(f"{self.path}: no file with id {file_id}")
        opened[0].close()

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(path, error) of the videos the last build could not read (the last run's list, whatever the
        generation answered from)."""
        return [
            (str(self.root / p), e) for p, e in self._follower.live_rows("SELECT path, error FROM failures")
        ]

    def close(self) -> None:
        """Stop following, and close the index once its last call is done; on a pinned view, nothing (the
        view ends with its block)."""
        if self._pin is None:
            self._follower.close()

    def __enter__(self) -> VideoIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_index(
    path: str | os.PathLike,
    model: VideoCLIP | None = None,
    device: str | None = None,
    precision: str = "auto",
    follow: float | None = FOLLOW_SECONDS,
    runtime: str | None = None,
) -> VideoIndex:
    """Open an index built by `build_index` for searching (see `VideoIndex`). It follows the runs that update
    it, checking at most every `follow` seconds on use (None: never; `VideoIndex.refresh` moves it).
    `runtime` runs the recorded model source in torch or onnxruntime (`stanvid.load_model`); either matches an
    index built with the other."""
    return VideoIndex(path, model=model, device=device, precision=precision, follow=follow, runtime=runtime)


def search_index(
    path: str | os.PathLike,
    text: str,
    k: int = 10,
    model: VideoCLIP | None = None,
    precision: str = "auto",
) -> list[SearchResult]:
    """One query against an index, with the model recorded in it (or `model`, which must be the same)."""
    with open_index(path, model=model, precision=precision, follow=None) as index:
        return index.search(text, k)
