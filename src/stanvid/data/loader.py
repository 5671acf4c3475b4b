"""DataLoader setup for video datasets: workers, pinned memory, seeding, distributed sampling, skip reports.

Decoding dominates the cost of a video batch, so the loader runs it in worker processes that stay alive
between epochs (``persistent_workers``), prefetches, and pins host memory for asynchronous copies to the
GPU. When ``torch.distributed`` is initialized each rank reads its own shard through a
``DistributedSampler``; call ``loader.set_epoch(epoch)`` so shuffling differs between epochs.

Every random draw is reproducible from ``seed``: the shuffling order comes from a generator seeded with it,
each worker gets ``torch``'s per-worker seed (derived from that generator), and ``worker_init_fn`` seeds
numpy's and Python's global generators from it too, for any transform that uses them.

Workers are never forked from the process that runs the model. Libraries that keep thread pools or per-thread
state (PyAV 18.1.1 keeps one image converter per thread, with a slice-thread pool) cannot survive a plain
``fork`` after the parent has used them: the child inherits a pool whose threads do not exist and waits on it
forever. So workers start from a ``forkserver`` (on Linux; ``spawn`` where there is none), a clean process
started once that has imported torch and stanvid but never decoded, as PyTorch advises for libraries that keep
threads. A worker then depends only on what its dataset pickles, not on what the parent did before.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from stanvid.data.base import SkippedSample, collate_skipping, format_skipped
from stanvid.errors import ConfigError

__all__ = ["VideoLoader", "make_loader", "build_loader", "position_seed", "seed_worker", "worker_context"]

# What the forkserver imports once, so that each worker forked from it starts without importing torch again.
FORKSERVER_PRELOAD = ["torch", "numpy", "stanvid.data.loader"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every loader worker: ``forkserver`` where the platform has it, else ``spawn``.

    Never ``fork``: see the module docstring (a forked worker inherits the parent's decoder thread state).
    ``STANVID_WORKER_START`` (``forkserver`` / ``spawn`` / ``fork``) overrides it, for measuring the cost.
    """
    methods = multiprocessing.get_all_start_methods()
    method = os.environ.get("STANVID_WORKER_START") or ("forkserver" if "forkserver" in methods else "spawn")
    if method not in methods:
        raise ConfigError(
            f"STANVID_WORKER_START={method!r} is not a start method here; choose from {methods}"
        )
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server first starts
    return context


def _start_worker(owner: int, init: Callable[[int], None] | None, worker_id: int) -> None:
    """Every worker's start: a watch on the process that made the loader (`owner`), then `init`.

    A worker's parent is the forkserver, not that process, so PyTorch's own check (the parent changed) never
    fires when the owner dies; and the forkserver lives while any worker holds its pipe. A worker the owner
    could not terminate (a signal landing while it was being started) would wait forever: the watch ends it
    within a second of its owner's end."""
    threading.Thread(target=_exit_with, args=(owner,), name="stanvid-owner-watch", daemon=True).start()
    if init is not None:
        init(worker_id)


def _exit_with(owner: int) -> None:
    while _alive(owner):
        time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (an exited process that its parent has not reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc: the signal check above is all there is


def seed_worker(worker_id: int) -> None:
    """Seed numpy's and Python's global generators from the worker's torch seed (unique per worker)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class VideoLoader:
    """A ``DataLoader`` that removes skipped samples from its batches and keeps the list of them.

    Iterating yields the collated batches (dicts) without the ``"skipped"`` key; batches in which every
    sample was skipped are not yielded. ``skipped`` accumulates one :class:`SkippedSample` per skipped item
    across epochs; ``skip_summary()`` formats them for the end of a run.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.skipped: list[SkippedSample] = []

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Sampler | None:
        return self.loader.sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a ``DistributedSampler`` for ``epoch`` (no-op otherwise)."""
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if isinstance(batch, dict) and "skipped" in batch:
                self.skipped.extend(batch.pop("skipped"))
                if not batch:
                    continue
            yield batch

    def skip_summary(self) -> str:
        return format_skipped(self.skipped)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 4,
    pin_memory: bool | None = None,
    seed: int = 0,
    drop_last: bool = False,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 2,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> VideoLoader:
    """A :class:`VideoLoader` over ``dataset``; under ``torch.distributed``, over this rank's shard of it.

    Args:
        batch_size: items per batch (per rank under ``torch.distributed``).
        shuffle: reshuffle every epoch (training).
        num_workers: decoding processes; 0 decodes in the calling process.
        pin_memory: page-locked batches for fast GPU copies; default: when CUDA is available.
        seed: seeds the shuffling, the distributed sampler and the workers' random draws.
        drop_last: drop the last incomplete batch (training).
        persistent_workers: keep workers between epochs; default: when ``num_workers > 0``.
        prefetch_factor: batches prefetched per worker (ignored without workers).
        collate_fn: default :func:`collate_skipping`, which also handles ``on_error="skip"`` records; with
            ``batch_size`` None, what the dataset yields, as it is.
    """
    sampler = None
    if dist.is_available() and dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False  # the sampler shuffles
    loader = build_loader(
        dataset,
        batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        seed=seed,
        drop_last=drop_last,
        persistent_workers=persistent_workers,
        prefetch_factor=prefetch_factor,
        collate_fn=collate_fn,
    )
    return VideoLoader(loader)


def build_loader(
    dataset: Dataset,
    batch_size: int | None,
    *,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    seed: int | torch.Generator = 0,
    drop_last: bool = False,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 2,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    worker_init_fn: Callable[[int], None] | None = seed_worker,
) -> DataLoader:
    """The ``DataLoader`` every stanvid loop reads through (training, evaluation, indexing, `make_loader`).

    One place for the settings that make a run repeatable and fast: a generator for the shuffling order and
    the workers' seeds (never the global torch RNG, so loading draws nothing from it), workers seeded by
    ``worker_init_fn``, and the worker-only options set only when there are workers.

    Args:
        batch_size: items per batch; None for a dataset that yields whole batches itself.
        shuffle: a new random order every epoch, from ``seed``; False with ``sampler``.
        sampler: the order (and share of a rank), e.g. a ``DistributedSampler``; none is added here.
        num_workers: worker processes; 0 loads in the calling process.
        pin_memory: page-locked batches for fast GPU copies; default: when CUDA is available (pinning needs it).
        seed: an int seeds a new generator; a ``torch.Generator`` is used as it is (a caller that reseeds it
            between epochs).
        drop_last: drop the last incomplete batch (training).
        persistent_workers: keep workers between epochs (a loader iterated more than once); default: when
            ``num_workers > 0``.
        prefetch_factor: batches prefetched per worker.
        collate_fn: default :func:`collate_skipping`, which also handles ``on_error="skip"`` records; with
            ``batch_size`` None, what the dataset yields, as it is.
        worker_init_fn: run in each worker as it starts; default :func:`seed_worker`.
    """
    if batch_size is not None and batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    worker_args: dict[str, Any] = {}
    if num_workers > 0:
        worker_args = {
            "persistent_workers": persistent_workers,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": functools.partial(_start_worker, os.getpid(), worker_init_fn),
            "multiprocessing_context": worker_context(),
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or (collate_skipping if batch_size is not None else _as_yielded),
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        **worker_args,
    )


def _as_yielded(item: Any) -> Any:
    """The collate of a dataset that yields whole batches (or chunks) itself: nothing to join."""
    return item


def position_seed(seed: int, epoch: int, batches_done: int) -> int:
    """The seed of a training loader's generator at a position (``batches_done`` batches into ``epoch``): the
    workers' seeds are drawn from that generator, so a run resumed at a position seeds its workers as the
    uninterrupted run did there."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + batches_done
