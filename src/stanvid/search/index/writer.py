"""From decoded chunks to committed rows: model-sized forward passes, and a commit per group of finished files
(their vectors appended to the store and made durable, then one transaction for their rows: a file's segments
always in the same transaction as its row)."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stanvid.precision import InferencePrecision
from stanvid.search.index.clips import encode_batch
from stanvid.search.index.loader import _Chunk
from stanvid.search.index.moment_store import MomentFeatures, normalized_half
from stanvid.search.index.store import _commit_files
from stanvid.search.index.vectors import VectorStore
from stanvid.search.rerank import frames_blob, keeps_frame_vectors


class _Writer:
    """Accumulates decoded chunks, encodes them `per_forward` clips at a time and commits the files they finish
    in one transaction once `commit_every` clips are encoded (and at the end)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        store: VectorStore,
        runner: InferencePrecision,
        per_forward: int,
        commit_every: int,
        on_commit: Callable[[int], None] | None,
        progress_bar: Any,
    ) -> None:
        self.conn, self.store, self.runner = conn, store, runner
        self.per_forward, self.commit_every = per_forward, commit_every
        self.on_commit = on_commit
        self.failures: list[tuple[str, str]] = []  # (relpath, error)
        self.bar = progress_bar
        self.pending: dict[str, dict[str, Any]] = {}  # relpath -> entry, meta, spans, embeddings, complete
        # ((relpath, moment samples?), (n, T, 3, S, S) uint8), oldest first
        self.buffer: list[tuple[tuple[str, bool], torch.Tensor]] = []
        self.buffered = 0
        self.uncommitted = 0  # clips encoded since the last commit
        self.committed = 0

    def add(self, chunk: _Chunk) -> None:
        key = chunk.entry.relpath
        if chunk.error is not None:
            self.pending.pop(key, None)
            self.buffer = [(k, c) for k, c in self.buffer if k[0] != key]
            self.buffered = sum(len(c) for _, c in self.buffer)
            self.failures.append((key, chunk.error))
            self.bar.update(1)
            return
        state = self.pending.setdefault(
            key,
            {"entry": chunk.entry, "meta": chunk.meta, "spans": [], "emb": [], "frames": [], "moments": []},
        )
        state["spans"].extend(chunk.spans)
        state["complete"] = chunk.last
        self.buffer.append(((key, chunk.moments), chunk.clips))
        self.buffered += len(chunk.clips)
        if self.buffered >= self.per_forward:
            self._encode_buffer(everything=False)
        if self.uncommitted >= self.commit_every:
            self._commit()

    def _encode(self, clips: torch.Tensor, frames: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, T, 3, S, S) uint8 -> (n, D) float32 unit vectors, and (n, T, D) per-frame vectors for a
        Mug-STAN model or when `frames` (moment samples among the clips), else None: `clips.encode_batch`."""
        keep = frames or keeps_frame_vectors(self.runner.model)
        return encode_batch(self.runner, clips, self.runner.device, keep)

    def _encode_buffer(self, everything: bool) -> None:
        """Encode the buffered clips in `per_forward` batches; a remainder smaller than a batch waits for more
        clips unless `everything`."""
        if not self.buffer:
            return
        keys = [k for k, c in self.buffer for _ in range(len(c))]
        clips = torch.cat([c for _, c in self.buffer])  # (n, T, 3, S, S)
        n = len(clips) if everything else len(clips) // self.per_forward * self.per_forward
        for k in range(0, n, self.per_forward):
            part = keys[k : min(n, k + self.per_forward)]
            emb, frames = self._encode(clips[k : k + len(part)], any(m for _, m in part))
            for i, ((key, moments), vec) in enumerate(zip(part, emb, strict=True)):
                state = self.pending[key]
                if moments:  # a clip of moment samples: its per-frame vectors, in time order
                    state["moments"].append(frames[i])
                    continue
                keep = keeps_frame_vectors(self.runner.model)
                state["emb"].append(vec)
                state["frames"].append(frames_blob(frames[i]) if keep else None)
        self.buffer = []  # the remainder, regrouped by file (clips of one file are contiguous)
        start = n
        for key, group in itertools.groupby(keys[n:]):
            count = len(list(group))
            self.buffer.append((key, clips[start : start + count]))
            start += count
        self.buffered = len(clips) - n
        self.uncommitted += n

    def _commit(self) -> None:
        self.uncommitted = 0
        done = [k for k, s in self.pending.items() if s.get("complete") and _encoded(s)]
        if not done:
            return
        files, vectors = [], []
        for key in done:
            s = self.pending.pop(key)
            files.append(
                (
                    s["entry"],
                    _with_moments(s),
                    [(a, b, f) for (a, b), f in zip(s["spans"], s["frames"], strict=True)],
                )
            )
            vectors += s["emb"]
        _commit_files(self.conn, self.store, files, np.stack(vectors).astype(np.float32))
        self.committed += len(done)
        self.bar.update(len(done))
        if self.on_commit is not None:
            self.on_commit(self.committed)

    def flush(self) -> None:
        self._encode_buffer(everything=True)
        self._commit()


def _encoded(state: dict[str, Any]) -> bool:
    """Every segment clip and every moment clip of a file whose chunks all arrived is encoded."""
    samples = state["meta"].get("moment_samples")
    moments = samples is None or sum(len(f) for f in state["moments"]) >= samples
    return len(state["emb"]) == len(state["spans"]) and moments


def _with_moments(state: dict[str, Any]) -> dict[str, Any]:
    """The file's probe meta, with its moment features (the padding of the last clip dropped) when kept."""
    meta = {k: v for k, v in state["meta"].items() if k != "moment_samples"}
    samples = state["meta"].get("moment_samples")
    if samples:
        per_frame = np.concatenate(state["moments"])[:samples]  # (n, D)
        meta["moments"] = MomentFeatures(state["meta"]["moment_step"], normalized_half(per_frame))
    return meta
