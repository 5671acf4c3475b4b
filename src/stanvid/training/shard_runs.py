"""Runs on WebDataset shards (``data.dataset: webdataset``): the split's files, the streamed training set, and
what ``stanvid train --dry-run`` checks before hours of training: every shard exists and reads, its sample
count, the first sample of each shard decodes into an item, and how many batches an epoch has on this many
processes and workers (with the samples the uneven shards leave out of each epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stanvid.data.datasets import SplitFiles
from stanvid.data.recognition import read_class_names
from stanvid.data.shard_dataset import SampleFields, SampleReader, ShardDataset
from stanvid.data.shard_order import batches_per_epoch
from stanvid.data.shards import ShardList, iter_samples, load_shards, sample_name, verify_counts
from stanvid.errors import ConfigError, DatasetError, VideoReadError
from stanvid.training.recipe import Recipe

__all__ = ["shard_split_files", "shard_fields", "shard_train_set", "check_shards"]


def _specs(recipe: Recipe, split: str) -> list[str]:
    value = recipe.data.train_annotations if split == "train" else recipe.data.test_annotations
    if not value:
        raise ConfigError(f"data.{split}_annotations is not set (the {split} split's shards)")
    return [value] if isinstance(value, str) else list(value)


def shard_split_files(recipe: Recipe, split: str) -> SplitFiles:
    """The split as the dataset table's ``webdataset`` reader takes it (patterns relative to ``data.root``)."""
    d = recipe.data
    specs = _specs(recipe, split)
    return SplitFiles(
        dataset=d.dataset,
        split=split,
        task=recipe.task,
        annotations=Path(specs[0]),
        videos=Path(d.root).expanduser(),
        class_names=d.path(d.class_names) if d.class_names else None,
        shards=tuple(specs),
        caption_key=d.caption_key,
        label_key=d.label_key,
        allow_pipe=d.allow_pipe_urls,
        max_sample_mb=d.max_sample_mb,
    )


def shard_fields(recipe: Recipe) -> SampleFields:
    d = recipe.data
    classes = read_class_names(d.path(d.class_names)) if d.class_names else None
    return SampleFields(recipe.task, d.caption_key, d.label_key, classes)


def shard_train_set(
    recipe: Recipe,
    transform: Callable[..., torch.Tensor],
    tokenizer: Callable[..., torch.Tensor] | None = None,
) -> ShardDataset:
    """The training split streamed from its shards, items as the map-style training sets build them."""
    d = recipe.data
    files = shard_split_files(recipe, "train")
    reader = SampleReader(
        shard_fields(recipe),
        transform,
        num_frames=d.num_frames,
        train=True,
        context_length=d.text_length,
        tokenizer=tokenizer,
        sampling=d.sampler,
        frame_interval=d.frame_interval,
    )
    shards = load_shards(list(files.shards), files.videos, allow_pipe=files.allow_pipe)
    return ShardDataset(
        shards,
        reader,
        seed=recipe.train.seed,
        buffer=d.shuffle_buffer,
        max_sample_bytes=d.max_sample_mb << 20,
    )


def _first_sample_problems(shards: ShardList, reader: SampleReader, max_bytes: int) -> list[str]:
    problems = []
    for url in shards.urls:
        sample = next((s for _, s in iter_samples(url, max_bytes=max_bytes)), None)
        if sample is None:
            continue  # an empty shard: reported by its count
        try:
            reader(sample, np.random.default_rng(0))
        except (VideoReadError, DatasetError) as exc:
            name = sample_name(url, sample["__key__"])
            problems.append(f"{name}: {str(exc).removeprefix(name + ': ')}")
    return problems


def check_shards(dataset: ShardDataset, recipe: Recipe, world: int) -> tuple[list[str], int]:
    """The dry run's lines for a streamed training split and its batches per epoch; raises `DatasetError`
    listing undecodable first samples, `ConfigError` when there are fewer shards than readers."""
    shards, t = dataset.shards, recipe.train
    k = max(1, recipe.data.num_workers)
    verify_counts(shards)  # an index's counts against the local tars: no plan on samples that are not there
    problems = _first_sample_problems(shards, dataset.reader, dataset.max_sample_bytes)
    if problems:
        listed = "\n  ".join(problems[:10])
        raise DatasetError(f"{len(problems)} shard(s) whose first sample does not decode:\n  {listed}")
    # raises when there are fewer shards than readers (train.epochs >= 1: epoch 0's deal is checked)
    batches = batches_per_epoch(shards.counts, world, k, t.batch_size, t.seed, t.epochs)
    trained = batches * t.batch_size * world
    empty = sum(1 for n in shards.counts if n == 0)
    return [
        f"shards  {shards.describe()}; the first sample of each decodes"
        + (f"; {empty} empty shard(s)" if empty else ""),
        f"readers {world} process(es) x {k} = {world * k} (data.num_workers {recipe.data.num_workers}); "
        f"{batches} batches per epoch, {trained} samples trained per epoch, "
        f"{shards.num_samples - trained} left out (uneven shards and the last partial batches; see "
        "stanvid.data.shard_order)",
    ], batches
