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
        self.buffer: list[tuple[str, torch.Tensor]] = []  # (relpath, (n, T, 3, S, S) uint8), oldest first
        self.buffered = 0
        self.uncommitted = 0  # clips encoded since the last commit
        self.committed = 0

    def add(self, chunk: _Chunk) -> None:
        key = chunk.entry.relpath
        if chunk.error is not None:
            self.pending.pop(key, None)
            self.buffer = [(k, c) for k, c in self.buffer if k != key]
            self.buffered = sum(len(c) for _, c in self.buffer)
            self.failures.append((key, chunk.error))
            self.bar.update(1)
            return
        state = self.pending.setdefault(
            key, {"entry": chunk.entry, "meta": chunk.meta, "spans": [], "emb": [], "frames": []}
        )
        state["spans"].extend(chunk.spans)
        state["complete"] = chunk.last
        self.buffer.append((key, chunk.clips))
        self.buffered += len(chunk.clips)
        if self.buffered >= self.per_forward:
            self._encode_buffer(everything=False)
        if self.uncommitted >= self.commit_every:
            self._commit()

    def _encode(self, clips: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, T, 3, S, S) uint8 -> (n, D) float32 unit vectors, and (n, T, D) per-frame vectors for a
        Mug-STAN model (else None): `clips.encode_batch`."""
        return encode_batch(self.runner, clips, self.runner.device, keeps_frame_vectors(self.runner.model))

    def _encode_buffer(self, everything: bool) -> None:
        """Encode the buffered clips in `per_forward` batches; a remainder smaller than a batch waits for more
        clips unless `everything`."""
        if not self.buffer:
            return
        keys = [k for k, c in self.buffer for _ in range(len(c))]
        clips = torch.cat([c for _, c in self.buffer])  # (n, T, 3, S, S)
        n = len(clips) if everything else len(clips) // self.per_forward * self.per_forward
        for k in range(0, n, self.per_forward):
            emb, frames = self._encode(clips[k : min(n, k + self.per_forward)])
            for i, (key, vec) in enumerate(zip(keys[k : k + len(emb)], emb, strict=True)):
                self.pending[key]["emb"].append(vec)
                self.pending[key]["frames"].append(None if frames is None else frames_blob(frames[i]))
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
        done = [k for k, s in self.pending.items() if s.get("complete") and len(s["emb"]) == len(s["spans"])]
        if not done:
            return
        files, vectors = [], []
        for key in done:
            s = self.pending.pop(key)
            files.append(
                (
                    s["entry"],
                    s["meta"],
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
