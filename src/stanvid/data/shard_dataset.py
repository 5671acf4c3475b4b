"""Training and evaluation data from WebDataset shards (``data.dataset: webdataset``).

`ShardDataset` streams a split's samples for training in the order `stanvid.data.shard_order` defines and
`ShardLoader` batches them, so each sample is read at most once per epoch over all ranks and workers (exactly
once when the shards divide evenly), shuffled from (seed, epoch), and a run resumed after ``n`` batches
starts from the sample after the last one trained on: the shards before it are not opened and the samples
before it in a shard are skipped unread (their bytes streamed past, never decoded). Each sample's random
draws (frames, crop, caption) come from ``(seed, epoch, shard, ordinal)``.

A sample's fields (see `stanvid.data.shards`): the video under its container's extension (``mp4``, ``webm``,
``mkv``, ... the first one present), the caption in ``txt`` or in a key of ``json`` (``data.caption_key``; a
list of captions gives one at random per training item and every caption as a query in evaluation), the
label in ``cls`` (an index) or in a key of ``json`` (``data.label_key``; an index or a class name). A sample
whose video does not decode or whose caption or label is missing or invalid is damaged: it is left out of its
batch and named (shard and key) with the reason at the end of the run, as ``on_error="skip"`` does for a
file; it still counts as a position of the order, so resuming stays exact. A missing or unreadable shard stops
the run with its name.

`load_shard_annotations` reads a split of local shards into the annotations the map-style datasets take, each
video read from its tar member by offset: the evaluation split and the dry run's checks.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stanvid.data.base import SkippedSample, VideoClipDataset, check_caption, collate_skipping
from stanvid.data.loader import build_loader, position_seed
from stanvid.data.recognition import RecognitionAnnotations
from stanvid.data.retrieval import RetrievalAnnotations
from stanvid.data.shard_order import batches_per_epoch, epoch_plan, reader_share
from stanvid.data.shards import (
    MAX_SAMPLE_BYTES,
    ShardList,
    _Keys,
    check_ending,
    check_sample_size,
    is_remote,
    iter_samples,
    sample_name,
    tar_reader_info,
)
from stanvid.errors import ConfigError, DatasetError, VideoReadError
from stanvid.video.decode import VIDEO_EXTENSIONS, MemoryVideo
from stanvid.video.sampling import dense_indices, uniform_indices

__all__ = [
    "SampleFields",
    "SampleReader",
    "ShardDataset",
    "ShardLoader",
    "ShardMembers",
    "join_batches",
    "load_shard_annotations",
    "sample_video",
]

_VIDEO_FIELDS = tuple(ext[1:] for ext in VIDEO_EXTENSIONS)


def sample_video(sample: dict[str, Any]) -> MemoryVideo:
    """A shard sample's video: its first field named for a video container (``mp4``, ``webm``, ...), named by
    its shard and key; `DatasetError` naming the sample and its fields when it has none."""
    name = sample_name(sample["__url__"], sample["__key__"])
    for ext in _VIDEO_FIELDS:
        if ext in sample:
            return MemoryVideo(sample[ext], name)
    fields = sorted(k for k in sample if not k.startswith("__"))
    raise DatasetError(f"{name}: no video member (.{', .'.join(_VIDEO_FIELDS[:5])}, ...); fields: {fields}")


@dataclass
class SampleFields:
    """Where a sample keeps its video, caption(s) and label (see the module docstring); each reader raises
    `DatasetError` naming the sample (shard and key) when its field is missing or invalid."""

    task: str  # "retrieval" or "recognition"
    caption_key: str | None = None
    label_key: str | None = None
    classes: list[str] | None = None
    _class_index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in ("retrieval", "recognition"):
            raise ConfigError(f"task must be 'retrieval' or 'recognition', got {self.task!r}")
        self._class_index = {name: i for i, name in enumerate(self.classes or [])}

    def video(self, sample: dict[str, Any]) -> MemoryVideo:
        return sample_video(sample)

    def _json(self, sample: dict[str, Any], key: str) -> Any:
        name = sample_name(sample["__url__"], sample["__key__"])
        if "json" not in sample:
            raise DatasetError(
                f"{name}: no .json member (data.caption_key / data.label_key {key!r} reads it)"
            )
        try:
            meta = json.loads(sample["json"])
        except ValueError as exc:
            raise DatasetError(f"{name}.json: invalid JSON ({exc})") from None
        if not isinstance(meta, dict) or key not in meta:
            raise DatasetError(f"{name}.json: no key {key!r}")
        return meta[key]

    def captions(self, sample: dict[str, Any]) -> list[str]:
        """Every caption of a sample (``txt``, or ``json[caption_key]``: a string or a list of strings)."""
        name = sample_name(sample["__url__"], sample["__key__"])
        if self.caption_key is None:
            if "txt" not in sample:
                raise DatasetError(f"{name}: no .txt caption (or set data.caption_key to a key of its .json)")
            value: Any = sample["txt"].decode("utf-8", "replace")
        else:
            value = self._json(sample, self.caption_key)
        texts = value if isinstance(value, list) else [value]
        if not texts:
            raise DatasetError(f"{name}: empty caption list")
        return [check_caption(text, name) for text in texts]

    def label(self, sample: dict[str, Any]) -> int:
        name = sample_name(sample["__url__"], sample["__key__"])
        if self.label_key is None:
            if "cls" not in sample:
                raise DatasetError(f"{name}: no .cls label (or set data.label_key to a key of its .json)")
            value: Any = sample["cls"].decode("utf-8", "replace").strip()
        else:
            value = self._json(sample, self.label_key)
        if isinstance(value, str) and value.lstrip("-").isdecimal():
            value = int(value)
        if isinstance(value, str) and value in self._class_index:
            return self._class_index[value]
        limit = len(self._class_index) if self.classes else None
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value
            and (limit is None or value < limit)
        ):
            return value
        raise DatasetError(f"{name}: label {value!r} is neither a class index nor a class name")


@dataclass
class SampleReader:
    """Turns a shard sample (field -> bytes) into a training item, as `RetrievalDataset` / `RecognitionDataset`
    turn a video file: ``{"video": (T, 3, S, S), "tokens", "caption", "video_id"}`` or ``{"video", "label",
    "video_id"}``. Problems raise `VideoReadError` / `DatasetError` naming the sample."""

    fields: SampleFields
    transform: Callable[..., torch.Tensor]
    num_frames: int
    train: bool = True
    context_length: int = 32
    sampling: str = "uniform"
    frame_interval: int = 1
    tokenizer: Callable[..., torch.Tensor] | None = None

    @property
    def task(self) -> str:
        return self.fields.task

    def _sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        mode = "train" if self.train else "test"
        if self.task == "recognition" and self.sampling == "dense":
            return dense_indices(n, self.num_frames, self.frame_interval, 1, mode=mode, rng=rng)
        return uniform_indices(n, self.num_frames, 1, mode=mode, rng=rng)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        item: dict[str, Any] = {"video_id": sample_name(sample["__url__"], sample["__key__"])}
        if self.task == "retrieval":  # the text first: a sample without one is not worth decoding
            texts = self.fields.captions(sample)
            caption = texts[int(rng.integers(len(texts)))] if self.train and len(texts) > 1 else texts[0]
        else:
            item["label"] = self.fields.label(sample)
        item["video"] = VideoClipDataset._read_clip(
            self.fields.video(sample), lambda n: self._sample(n, rng), self.transform, rng
        )  # (T, 3, S, S)
        if self.task == "retrieval":
            item["tokens"] = self._tokenize(caption)
            item["caption"] = caption
        return item

    def _tokenize(self, text: str) -> torch.Tensor:
        if self.tokenizer is not None:
            return self.tokenizer([text], context_length=self.context_length)[0]
        from stanvid.models.tokenizer import tokenize

        return tokenize([text], context_length=self.context_length)[0]  # (context_length,)


class ShardDataset(IterableDataset):
    """A training split streamed from shards (see the module docstring); `ShardLoader` drives it.

    Args:
        shards: the split's shards with their sample counts (`stanvid.data.shards.load_shards`).
        reader: builds an item from a sample.
        seed: the run's seed (shard order, shuffle buffer, each sample's draws).
        buffer: shuffle buffer size in samples (memory: ``buffer x`` the mean sample size, per reader).
        on_error: ``"skip"`` (damaged samples reported at the end) or ``"raise"``.
        max_sample_bytes: the most a sample's members may hold (a larger one stops the run, named).
    """

    def __init__(
        self,
        shards: ShardList,
        reader: SampleReader,
        *,
        seed: int = 0,
        buffer: int = 100,
        on_error: str = "skip",
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1 (1: no shuffling), got {buffer}")
        self.shards, self.reader = shards, reader
        self.seed, self.buffer, self.on_error = int(seed), int(buffer), on_error
        self.max_sample_bytes = int(max_sample_bytes)
        # world, rank, readers per rank, batch size, batches per epoch; None until `configure`: iterated as any
        # PyTorch dataset, it is then one reader giving the whole epoch one sample at a time (`_layout`)
        self.layout: tuple[int, int, int, int, int] | None = None
        self.position = (0, 0)  # epoch, batches done in it
        self.collate: Callable[[list[Any]], Any] | None = None  # set: yield each batch's part, collated

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples

    def configure(self, world: int, rank: int, readers: int, batch_size: int, epochs: int) -> int:
        """Fix the readers and batch size; returns the batches every rank takes per epoch."""
        n = batches_per_epoch(self.shards.counts, world, readers, batch_size, self.seed, epochs)
        self.layout = (world, rank, readers, batch_size, n)
        return n

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.position = (int(epoch), int(batches_done))

    def _layout(self) -> tuple[int, int, int, int, int]:
        """The configured layout, or for an unconfigured dataset in one process: the whole epoch, one sample
        per step. Several DataLoader workers must agree on a plan, which only `configure` fixes."""
        if self.layout is not None:
            return self.layout
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ConfigError(
                f"a ShardDataset read by {info.num_workers} DataLoader workers needs its plan: call "
                "dataset.configure(world, rank, readers=num_workers, batch_size, epochs) first, or iterate "
                "stanvid.data.ShardLoader(dataset, batch_size, num_workers=...)"
            )
        return 1, 0, 1, 1, batches_per_epoch(self.shards.counts, 1, 1, 1, self.seed, 1)

    def __iter__(self) -> Iterator[Any]:
        """This reader's items from the position; with ``collate`` set, its part of each batch, collated (an
        empty part too, so that the parts of batch j are the j-th of every reader)."""
        items = self._items()
        if self.collate is None:
            yield from items
            return
        _, _, k, batch_size, batches = self._layout()
        info = get_worker_info()
        w = 0 if info is None else info.id
        for j in range(self.position[1], batches):
            size = reader_share((j + 1) * batch_size, k, w) - reader_share(j * batch_size, k, w)
            yield self.collate([next(items) for _ in range(size)])

    def _items(self) -> Iterator[dict[str, Any] | SkippedSample]:
        world, rank, k, batch_size, batches = self._layout()
        info = get_worker_info()
        w, readers = (0, 1) if info is None else (info.id, info.num_workers)
        if readers != k:
            raise ConfigError(f"the shard order was planned for {k} reader(s) per rank, not {readers}")
        epoch, done = self.position
        plan = epoch_plan(
            self.shards.counts,
            world=world,
            rank=rank,
            k=k,
            w=w,
            batch_size=batch_size,
            batches=batches,
            batches_done=done,
            buffer=self.buffer,
            seed=self.seed,
            epoch=epoch,
        )
        for shard, ordinal, pos, sample in self._stream(plan):
            rng = np.random.default_rng([self.seed, epoch, shard, ordinal])
            try:
                yield self.reader(sample, rng)
            except (VideoReadError, DatasetError) as err:
                if self.on_error == "raise":
                    raise
                name = sample_name(sample["__url__"], sample["__key__"])
                reason = str(err).removeprefix(f"{name}: ")
                yield SkippedSample(index=int(pos), path=name, reason=reason)

    def _stream(self, plan) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """The plan's samples from its start, in emission order: (shard, ordinal, stream position, sample)."""
        needed = plan.order[plan.start :]
        if len(needed) == 0:
            return
        slots, ordinals = plan.locate(needed)
        slots, ordinals = slots.tolist(), ordinals.tolist()  # needed[i] is ordinal ordinals[i] of slots[i]
        wanted: dict[int, set[int]] = {}
        for slot, ordinal in zip(slots, ordinals, strict=True):
            wanted.setdefault(slot, set()).add(ordinal)
        starts = np.cumsum([0, *plan.counts])
        held: dict[int, dict[str, Any]] = {}
        nxt = 0
        for slot in sorted(wanted):  # shards with nothing left to emit are not opened
            shard = plan.shards[slot]
            url = self.shards.urls[shard]
            keep = wanted[slot]
            seen = 0
            for ordinal, sample in iter_samples(url, keep=keep.__contains__, max_bytes=self.max_sample_bytes):
                seen = ordinal + 1
                if ordinal not in keep:
                    continue
                held[int(starts[slot]) + ordinal] = sample
                while nxt < len(needed) and int(needed[nxt]) in held:
                    pos = int(needed[nxt])
                    yield plan.shards[slots[nxt]], ordinals[nxt], pos, held.pop(pos)
                    nxt += 1
            if seen < max(keep) + 1:
                raise DatasetError(
                    f"shard {url} ends after {seen} samples; its count says {plan.counts[slot]} "
                    "(it changed since it was counted, or it is truncated)"
                )
        if nxt != len(needed):  # cannot happen when every shard holds its counted samples
            raise DatasetError(
                f"{len(needed) - nxt} planned samples were not read (shards changed while reading)"
            )


def join_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Collated parts of one batch as one: tensors joined along dim 0, lists concatenated, in part order; a
    key some parts lack (a part whose every sample was skipped has only ``skipped``) is taken from the rest."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        out[key] = (
            torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
        )
    return out


def _pin(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ShardLoader:
    """Batches of a `ShardDataset` for this rank, from a position: ``set_position(epoch, batches_done)``, then
    iterate. Each iteration starts fresh worker processes (the position travels with the dataset). Item ``i``
    of the rank's stream comes from reader ``i mod k``; each worker collates its part of a batch and the parts
    are joined here reader by reader (`join_batches`), so a batch mixes every reader's shards and equals, in
    order, the global batch of ``k`` ranks of one reader each. ``collate_fn`` must return a dict of tensors
    (joined along dim 0) and lists (concatenated), as `stanvid.data.collate_skipping` does."""

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        *,
        world: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        epochs: int = 1,
        pin_memory: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.num_workers = dataset, int(batch_size), int(num_workers)
        self.batches_per_epoch = dataset.configure(world, rank, max(1, num_workers), batch_size, epochs)
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.collate_fn = collate_fn or collate_skipping

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.dataset.set_position(epoch, batches_done)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.dataset.position[1], 0)

    def __iter__(self) -> Iterator[Any]:
        epoch, done = self.dataset.position
        # its own generator: creating the iterator draws nothing from the global torch RNG (which a resumed
        # run restores), and the workers' seeds are a function of the position
        generator = torch.Generator().manual_seed(position_seed(self.dataset.seed, epoch, done))
        loader = build_loader(
            self.dataset,
            None,  # the dataset yields each worker's collated part of a batch
            num_workers=self.num_workers,
            pin_memory=False,
            seed=generator,
            persistent_workers=False,  # fresh workers: the position travels with the dataset
            prefetch_factor=self.prefetch_factor,
        )
        self.dataset.collate = self.collate_fn
        k = max(1, self.num_workers)
        parts: list[Any] = []
        for part in loader:  # the DataLoader's round-robin: batch j's part of worker 0, 1, ..., k - 1
            parts.append(part)
            if len(parts) == k:
                batch = join_batches(parts)
                yield _pin(batch) if self.pin_memory else batch
                parts = []


# ---- map-style access to local shards (evaluation, dry run) ------------------------------------------------


@dataclass(frozen=True)
class ShardMembers:
    """The video of each sample of local shards, read from its tar member by offset: ``members(i)`` is
    sample i's `MemoryVideo`. Picklable (DataLoader workers open the files themselves)."""

    names: tuple[str, ...]
    places: tuple[tuple[str, int, int], ...]  # (tar path, data offset, size)

    def __call__(self, index: int) -> MemoryVideo:
        path, offset, size = self.places[index]
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise VideoReadError(f"{self.names[index]}: cannot read ({exc.strerror or exc})") from None
        if len(data) != size:
            raise VideoReadError(f"{self.names[index]}: the shard ends inside this member")
        return MemoryVideo(data, self.names[index])


def _index_local_shard(url: str, max_bytes: int) -> list[dict[str, Any]]:
    """Samples of a local shard: key, small fields' bytes, and the video member's (offset, size)."""
    if is_remote(url):
        raise ConfigError(
            f"{url}: evaluation and the dry run read shards by member offset, so they must be local files "
            "(stream pipe:/URL shards for training only)"
        )
    keys, samples, info_class = _Keys(), [], tar_reader_info()
    try:
        with tarfile.open(url, mode="r:", tarinfo=info_class) as tar:
            for info in tar:
                member = keys.member(info)
                if member is None:
                    continue
                if keys.ordinal == len(samples):
                    samples.append({"__key__": member[0], "__url__": url})
                sample = samples[-1]
                sample["__bytes__"] = sample.get("__bytes__", 0) + info.size
                check_sample_size(url, member[0], sample["__bytes__"], max_bytes)
                if member[1] in _VIDEO_FIELDS and "__video__" not in sample:
                    sample["__video__"] = (url, info.offset_data, info.size)
                elif member[1] not in _VIDEO_FIELDS:
                    sample[member[1]] = tar.extractfile(info).read()
    except FileNotFoundError:
        raise DatasetError(f"shard {url} does not exist (a missing shard stops the run)") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"shard {url}: not a readable (uncompressed) tar file ({exc})") from None
    check_ending(url, info_class, len(samples))
    return samples


def load_shard_annotations(
    shards: ShardList, reader: SampleFields, name: str = "webdataset", max_bytes: int = MAX_SAMPLE_BYTES
) -> RetrievalAnnotations | RecognitionAnnotations:
    """A split of local shards as map-style annotations (every caption a query; labels as `SampleFields` reads
    them), videos read by offset through `ShardMembers`. A sample without a video member raises `DatasetError`
    naming it."""
    ids, names, places, captions, text_to_video, labels = [], [], [], [], [], []
    for url, count in zip(shards.urls, shards.counts, strict=True):
        samples = _index_local_shard(url, max_bytes)
        if len(samples) != count:
            raise DatasetError(f"shard {url} holds {len(samples)} samples, its index says {count}")
        for sample in samples:
            label = sample_name(url, sample["__key__"])
            if "__video__" not in sample:
                raise DatasetError(
                    f"{label}: no video member (fields: {sorted(k for k in sample if k[0] != '_')})"
                )
            if reader.task == "retrieval":
                for text in reader.captions(sample):
                    captions.append(text)
                    text_to_video.append(len(ids))
            else:
                labels.append(reader.label(sample))
            ids.append(label)
            names.append(label)
            places.append(sample["__video__"])
    members = ShardMembers(tuple(names), tuple(places))
    where = f"{name}:{os.path.commonpath(shards.urls)}"
    if reader.task == "retrieval":
        return RetrievalAnnotations(where, ids, names, captions, np.array(text_to_video), sources=members)
    return RecognitionAnnotations(where, ids, names, np.array(labels), reader.classes, sources=members)
