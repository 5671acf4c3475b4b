"""The order of training samples, as a function of (seed, epoch) alone, so that a resumed run continues with the
sample after the last one trained on.

`EpochSampler` hands this rank its share of the epoch's seeded permutation from a position; `SeededItems`
serves each item with random draws seeded by (seed, epoch, index); `build_data` builds the loader on them.
Streamed shards (`stanvid.data.ShardDataset`) have an order of their own with the same property
(`stanvid.data.shard_order`), which `build_data` sets up through a `stanvid.data.ShardLoader`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from stanvid.data.loader import build_loader, position_seed
from stanvid.data.shard_dataset import ShardDataset, ShardLoader
from stanvid.errors import ConfigError
from stanvid.training.recipe import Recipe

# ---- data order that a resumed run can reproduce -------------------------------------------------------------


class EpochSampler(Sampler):
    """This rank's share of the epoch's seeded permutation, from a start position, as ``(epoch, index)``.

    The permutation is ``DistributedSampler``'s (seed + epoch, sharded ``rank::world``, tail dropped), so it is
    a function of (seed, epoch, rank, world) alone; `set_position` skips the items already trained on.
    """

    def __init__(self, dataset: Dataset, world: int, rank: int, seed: int) -> None:
        self.inner = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    @property
    def items_per_epoch(self) -> int:
        return len(self.inner)

    def __len__(self) -> int:
        return max(len(self.inner) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, index in enumerate(self.inner):
            if i >= self.start:
                yield self.epoch, index


class SeededItems(Dataset):
    """Serves ``(epoch, index)`` keys: item ``index`` of the dataset, its random draws seeded by (seed, epoch,
    index) through the dataset's ``set_epoch_seed`` hook (`stanvid.data.VideoClipDataset.set_epoch_seed`),
    so they do not depend on which worker decodes it nor on what that worker decoded before. A dataset
    without the hook is served as it is."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        set_epoch_seed = getattr(self.dataset, "set_epoch_seed", None)
        if set_epoch_seed is not None:
            set_epoch_seed(self.seed, epoch)  # this process's copy: the key's epoch, in a worker or not
        return self.dataset[index]


@dataclass
class TrainData:
    """The training data of this rank: order a function of (seed, epoch), items' draws of (seed, epoch, index).
    ``start(epoch, batches_done)`` positions ``loader`` there; iterating it then gives the rest of the epoch."""

    loader: DataLoader | ShardLoader
    batches_per_epoch: int
    start: Callable[[int, int], None]


def build_data(
    train_set: Dataset,
    recipe: Recipe,
    rank: int,
    world: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> TrainData:
    """This rank's sampler and loader; refuses a batch larger than this rank's share of the data."""
    tr = recipe.train
    if isinstance(train_set, ShardDataset):
        return _shard_data(train_set, recipe, rank, world, device, collate_fn)
    sampler = EpochSampler(train_set, world, rank, tr.seed)
    batches_per_epoch = sampler.items_per_epoch // tr.batch_size
    if batches_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size {tr.batch_size} x {world} process(es) exceeds the {len(train_set)} training items"
        )
    # the loader's generator: reseeded per (epoch, start) so the workers' seeds repeat on resume
    generator = torch.Generator()
    loader = build_loader(
        SeededItems(train_set, tr.seed),
        tr.batch_size,
        sampler=sampler,
        num_workers=recipe.data.num_workers,
        pin_memory=device.type == "cuda",
        seed=generator,
        drop_last=True,
        collate_fn=collate_fn,
    )

    def start(epoch: int, batches_done: int) -> None:
        sampler.set_position(epoch, batches_done * tr.batch_size)
        generator.manual_seed(position_seed(tr.seed, epoch, batches_done))

    return TrainData(loader, batches_per_epoch, start)


def _shard_data(
    train_set: ShardDataset,
    recipe: Recipe,
    rank: int,
    world: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> TrainData:
    """Streamed shards: ``processes x max(1, data.num_workers)`` readers, the same batches per epoch on every
    rank (`stanvid.data.shard_order`)."""
    tr = recipe.train
    loader = ShardLoader(
        train_set,
        tr.batch_size,
        world=world,
        rank=rank,
        num_workers=recipe.data.num_workers,
        epochs=tr.epochs,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
    )
    if loader.batches_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size {tr.batch_size} x {world} process(es) exceeds what the shards give every rank per "
            f"epoch ({train_set.num_samples} samples in {len(train_set.shards)} shards)"
        )
    return TrainData(loader, loader.batches_per_epoch, loader.set_position)
