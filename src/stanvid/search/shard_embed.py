"""`stanvid embed SHARDS`: one embedding per sample of WebDataset shards (the clip-retrieval use: embedding a
pretraining set), read by streaming, so local, ``pipe:`` and URL shards all work.

Each sample's video is embedded as the index embeds a whole file (`stanvid.search.index.clips.read_clip`:
``model.config.num_frames`` frames sampled uniformly, shortest side resized, centre crop). Work is kept per
shard: a finished shard's vectors and keys are written to ``OUT.parts/`` (atomically), so a stopped run
re-started with the same model and shards encodes only the shards not yet done. The output, written in one
atomic step at the end, is ``OUT`` (``.npy``: the ``(N, D)`` float32 unit vectors) with ``OUT`` as ``.json``
(``{"model", "model_fingerprint", "dim", "shards", "rows": [{"shard", "key", "caption"}, ...]}``), or a
``.parquet`` table (``shard``, ``key``, ``caption``, ``vector``). Samples whose video does not decode are
left out and listed in the summary with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stanvid.data.loader import build_loader
from stanvid.data.shard_dataset import sample_video
from stanvid.data.shards import (
    MAX_SAMPLE_BYTES,
    ShardList,
    iter_samples,
    load_shards,
    sample_name,
    verify_counts,
)
from stanvid.distributed import default_device
from stanvid.errors import DatasetError, VideoReadError
from stanvid.fileio import atomic_write_bytes, atomic_write_stream
from stanvid.precision import prepare_for_inference
from stanvid.search.index.build import _model
from stanvid.search.index.clips import encode_clips, read_clip
from stanvid.video.decode import probe

__all__ = ["ShardEmbedResult", "embed_shards"]


@dataclass
class ShardEmbedResult:
    out: Path
    rows: int
    dim: int
    shards_encoded: int  # by this run (the others were done before)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"wrote {self.rows} rows of dimension {self.dim} to {self.out} ({self.shards_encoded} shards encoded now)"
        ]
        lines += [f"  FAILED {name}: {reason}" for name, reason in self.failed]
        return "\n".join(lines)


class _ShardClips(IterableDataset):
    """(shard, ordinal, key, caption, clip or error) for the samples of the shards to do, split over workers.
    A shard that cannot be read, or holds another number of samples than its count, gives one item
    (shard, -1, "", "", message) and ends the run there (`_shard_failure`)."""

    def __init__(
        self, shards: ShardList, todo: Sequence[int], clip_len: int, image_size: int, fit: tuple[str, str]
    ) -> None:
        self.urls, self.counts = list(shards.urls), list(shards.counts)
        self.todo, self.clip_len, self.image_size = list(todo), clip_len, image_size
        self.fit = fit  # the model's resize rule (`PreprocessConfig.fit`)
        self.max_bytes = MAX_SAMPLE_BYTES

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        mine = self.todo if info is None else self.todo[info.id :: info.num_workers]
        for shard in mine:
            try:
                yield from self._shard(shard)
            except DatasetError as exc:  # one line to the main process (a worker's raise adds a traceback)
                yield shard, -1, "", "", str(exc)
                return

    def _shard(self, shard: int) -> Iterator[tuple]:
        url, count, seen = self.urls[shard], self.counts[shard], 0
        for ordinal, sample in iter_samples(url, max_bytes=self.max_bytes):
            if ordinal >= count:
                raise DatasetError(f"shard {url} holds more samples than its count {count}")
            seen = ordinal + 1
            yield from self._sample(shard, ordinal, sample)
        if seen != count:
            raise DatasetError(f"shard {url} holds {seen} samples, its count says {count}")

    def _sample(self, shard: int, ordinal: int, sample: dict[str, Any]) -> Iterator[tuple]:
        name = sample_name(self.urls[shard], sample["__key__"])
        caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
        try:
            video = sample_video(sample)
            clip = read_clip(
                video,
                0.0,
                probe(video).duration,
                clip_len=self.clip_len,
                image_size=self.image_size,
                fit=self.fit,
            )
        except (VideoReadError, DatasetError) as exc:  # a video that does not decode, or none
            yield shard, ordinal, sample["__key__"], caption, str(exc).removeprefix(f"{name}: ")
            return
        yield shard, ordinal, sample["__key__"], caption, clip  # (T, 3, S, S) uint8


def embed_shards(
    spec: str | Sequence[str],
    out: str | os.PathLike,
    model: Any,
    *,
    model_overrides: dict[str, Any] | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    root: str | os.PathLike = ".",
    allow_pipe: bool = False,
    max_sample_mb: int = MAX_SAMPLE_BYTES >> 20,
    runtime: str | None = None,
) -> ShardEmbedResult:
    """Embed every sample of the shards ``spec`` (a pattern, a list, or a shard index) into ``out``.

    ``allow_pipe``: run the ``pipe:`` URLs a shard index names (`stanvid.data.shards.read_shard_index`);
    ``max_sample_mb``: the most one sample's members may hold (a larger one stops the run, named);
    ``runtime`` runs a model source in torch or onnxruntime (`stanvid.load_model`)."""
    from stanvid.search.embed import _check_out  # the output formats and their checks

    out = Path(out).expanduser().resolve()
    suffix = _check_out(out)
    shards = load_shards(spec, root, allow_pipe=allow_pipe)
    model, source, _, fingerprint = _model(model, None, model_overrides, runtime)
    dev = torch.device(device) if device is not None else default_device()
    runner = prepare_for_inference(model.to(dev), precision, dev)
    parts = out.with_name(out.name + ".parts")
    done = _claim_parts(parts, {"model_fingerprint": fingerprint, "shards": list(shards.urls)})
    todo = [i for i in range(len(shards)) if i not in done]
    verify_counts(shards)  # local shards against their index: an error now, not a missing part at the end
    cfg = model.config
    clips = _ShardClips(shards, todo, cfg.num_frames, cfg.clip.vision.image_size, cfg.clip.preprocess.fit)
    clips.max_bytes = max_sample_mb << 20
    workers = min(num_workers, len(todo))
    loader = build_loader(clips, None, num_workers=workers, pin_memory=False, persistent_workers=False)
    pending: dict[int, list] = {i: [] for i in todo}
    failed: list[tuple[str, str]] = []
    batch: list[tuple] = []
    bar = _bar(progress, shards.num_samples - sum(shards.counts[i] for i in done))

    def flush() -> set[int]:
        """Encode the batch; the shards it had samples of."""
        vectors = encode_clips(model, torch.stack([b[4] for b in batch]), dev, batch_size, runner)  # (b, D)
        for item, vector in zip(batch, vectors, strict=True):
            pending[item[0]].append((item[1], item[2], item[3], vector))
        touched = {item[0] for item in batch}
        batch.clear()
        return touched

    for item in loader:
        if item[1] == -1:  # the shard cannot be read or holds another count: stop, naming it
            raise DatasetError(item[4])
        if isinstance(item[4], str):
            failed.append((sample_name(shards.urls[item[0]], item[2]), item[4]))
            pending[item[0]].append((item[1], item[2], item[3], None))
            touched = {item[0]}
        else:
            batch.append(item)
            touched = flush() if len(batch) == batch_size else set()
        if bar is not None:
            bar.update(1)
        # only a shard that just gained rows can have become complete (none of its samples still batched)
        _write_finished(parts, shards, pending, touched - {b[0] for b in batch})
    if batch:
        flush()
    _write_finished(parts, shards, pending, set(pending))  # the rest, shards of no sample among them
    if bar is not None:
        bar.close()
    rows, vectors = _gather(parts, shards)
    meta = {"model": source, "model_fingerprint": fingerprint, "dim": int(vectors.shape[1]), "shards": spec}
    if suffix == ".parquet":
        _write_parquet_rows(out, rows, vectors)
    else:
        atomic_write_stream(out, lambda f: np.save(f, vectors))
        atomic_write_bytes(
            out.with_suffix(".json"),
            json.dumps({"vectors": out.name, **meta, "rows": rows}, indent=1).encode(),
        )
    return ShardEmbedResult(out, len(rows), int(vectors.shape[1]), len(todo), failed)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="video", desc="embed shards", dynamic_ncols=True)


def _claim_parts(parts: Path, wanted: dict[str, Any]) -> set[int]:
    """The shard indices already done by an earlier run with the same model and shards (others start over)."""
    parts.mkdir(parents=True, exist_ok=True)
    manifest = parts / "manifest.json"
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError):  # none yet, or damaged: the parts are a cache, so start over
        found = None
    if found == wanted:
        return {
            int(p.stem)
            for p in parts.glob("*.json")
            if p.stem.isdecimal() and (parts / f"{p.stem}.npy").exists()
        }
    for old in parts.glob("*"):
        old.unlink()
    atomic_write_bytes(manifest, json.dumps(wanted).encode())
    return set()


def _write_finished(parts: Path, shards: ShardList, pending: dict[int, list], candidates: set[int]) -> None:
    """Write the part of every shard of `candidates` (none of them with a sample waiting in the batch) whose
    samples are all encoded. Checking only the shards that just gained rows keeps this off the per-sample
    cost: `pending` holds every shard not yet written."""
    for shard in sorted(s for s in candidates if s in pending and len(pending[s]) == shards.counts[s]):
        rows = sorted(pending.pop(shard), key=lambda r: r[0])
        kept = [r for r in rows if r[3] is not None]
        vectors = np.stack([r[3] for r in kept]) if kept else np.zeros((0, 0), np.float32)
        atomic_write_stream(parts / f"{shard:05d}.npy", lambda f, v=vectors: np.save(f, v.astype(np.float32)))
        keys = [{"key": r[1], "caption": r[2]} for r in kept]
        atomic_write_bytes(
            parts / f"{shard:05d}.json", json.dumps(keys).encode()
        )  # last: marks the part done


def _gather(parts: Path, shards: ShardList) -> tuple[list[dict[str, Any]], np.ndarray]:
    rows, blocks = [], []
    for i, url in enumerate(shards.urls):
        keys = json.loads((parts / f"{i:05d}.json").read_text())
        vectors = np.load(parts / f"{i:05d}.npy")
        rows += [{"shard": url, **k} for k in keys]
        if len(keys):
            blocks.append(vectors)
    if not blocks:
        raise DatasetError(f"no sample of the {len(shards)} shards could be embedded")
    return rows, np.concatenate(blocks)


def _write_parquet_rows(out: Path, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "shard": [r["shard"] for r in rows],
            "key": [r["key"] for r in rows],
            "caption": [r["caption"] for r in rows],
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]
            ),
        }
    )
    atomic_write_stream(out, lambda f: pq.write_table(table, f))
