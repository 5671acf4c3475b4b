"""The order of training samples streamed from shards, as a function of (seed, epoch) and the sample counts, so
that a resumed run continues with the sample after the last one trained on without reading the ones before.

**Readers.** A run reads with ``R = world x k`` readers, ``k = max(1, data.num_workers)`` per rank; reader
``g = rank * k + w`` is worker ``w`` of rank ``rank`` (the rank's own process when there are no workers). The
order depends on ``R`` (and on ``world`` and ``k`` only through it), so a run resumes with the same number of
processes and workers.

**Shards to readers.** Each epoch the shards are permuted by ``(seed, epoch)`` and dealt, in that order, to
the reader holding the fewest samples so far (the lowest-numbered on a tie): equal shards go round-robin, and
a short last shard evens out. Every shard is read by exactly one reader, so no sample is read twice. There
must be at least ``R`` shards.

**A reader's stream.** Its shards' samples in order, through a shuffle buffer of ``B = data.shuffle_buffer``
samples: the first ``B`` fill it; then each new sample takes the place of one drawn at random, which is
emitted; at the end the rest come out in random order. The draws are seeded by ``(seed, epoch, reader)``,
and the whole emission order is computed from the counts alone, before any byte is read
(`emission_order`), so any position in it can be started from. At most ``B + 1`` samples are held.

**Batches.** A rank's batch ``j`` is items ``j * b .. j * b + b - 1`` of its stream, item ``i`` being the next
emission of its reader ``i mod k`` (the DataLoader's round-robin over its workers). A global batch is the
ranks' batches together: the same samples for ``world=2, k=1, b`` as for ``world=1, k=2, 2b``.

**Uneven shards.** Every rank must take the same number of steps, and every reader must have the samples its
share asks for, so an epoch has ``min over epochs, ranks of N_r // b`` batches, with ``N_r = min over w of
(k * n_w + w)`` for the rank's readers' sample counts ``n_w`` (the longest prefix of the rank's stream its
readers can fill). The samples after a reader's share are not trained on in that epoch: the tail of each
longer reader's emission order (with equal shards dividing evenly among readers, only the fewer than ``b``
per rank that no full batch takes; otherwise up to about one shard per reader). The shard order changes every
epoch, so a different tail is left each time. `EpochPlan.left_out` counts them.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stanvid.errors import ConfigError

__all__ = ["readers_shards", "emission_order", "batches_per_epoch", "reader_share", "EpochPlan", "epoch_plan"]

_SHARD_STREAM, _BUFFER_STREAM = 0x5A4D, 0xB0FF  # separate seed streams for the two kinds of draws


def readers_shards(counts: Sequence[int], readers: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per reader in read order: the (seed, epoch) permutation dealt to the least-loaded."""
    if len(counts) < readers:
        raise ConfigError(
            f"{len(counts)} shard(s) for {readers} readers (processes x data.num_workers): each reader needs a "
            "shard of its own; use fewer workers or more, smaller shards (stanvid shard --samples-per-shard)"
        )
    order = np.random.default_rng([seed, epoch, _SHARD_STREAM]).permutation(len(counts))
    heap = [(0, g) for g in range(readers)]
    out: list[list[int]] = [[] for _ in range(readers)]
    for shard in order.tolist():
        load, g = heapq.heappop(heap)
        out[g].append(shard)
        heapq.heappush(heap, (load + int(counts[shard]), g))
    return out


def emission_order(length: int, buffer: int, seed: int, epoch: int, reader: int) -> np.ndarray:
    """``(length,)`` stream positions in the order a shuffle buffer of ``buffer`` samples emits them."""
    if buffer < 1:
        raise ConfigError(f"data.shuffle_buffer must be >= 1 (1: no shuffling), got {buffer}")
    rng = np.random.default_rng([seed, epoch, reader, _BUFFER_STREAM])
    picks = rng.integers(0, buffer, size=max(length - buffer, 0)).tolist()
    held = list(range(min(buffer, length)))
    out = []
    for pos, j in zip(range(buffer, length), picks, strict=True):
        out.append(held[j])
        held[j] = pos
    out.extend(rng.permutation(np.array(held, dtype=np.int64)).tolist())
    return np.asarray(out, dtype=np.int64)


def reader_share(items: int, k: int, w: int) -> int:
    """How many of a rank's first ``items`` stream items come from its reader ``w`` (item i from i mod k)."""
    return max(0, (items - w + k - 1) // k)


def _rank_items(loads: Sequence[int], k: int) -> int:
    """The longest prefix of a rank's stream that its readers' sample counts ``loads`` can fill."""
    return min(k * n + w for w, n in enumerate(loads))


def batches_per_epoch(
    counts: Sequence[int], world: int, k: int, batch_size: int, seed: int, epochs: int
) -> int:
    """Batches every rank takes in every epoch (the same for all epochs, so the schedule has fixed epochs)."""
    readers = world * k
    best = None
    for epoch in range(epochs):
        shards = readers_shards(counts, readers, seed, epoch)
        loads = [sum(int(counts[s]) for s in mine) for mine in shards]
        for rank in range(world):
            n = _rank_items(loads[rank * k : (rank + 1) * k], k) // batch_size
            best = n if best is None else min(best, n)
    return int(best or 0)


@dataclass(frozen=True)
class EpochPlan:
    """One reader's part of an epoch: its shards, their counts, the emission order and how much it reads."""

    shards: list[int]  # indices into the shard list, in read order
    counts: list[int]
    order: np.ndarray  # (share,) stream positions in emission order
    start: int  # emissions already consumed (resume)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard slot, ordinal in its shard) of stream positions."""
        ends = np.cumsum(self.counts)
        slot = np.searchsorted(ends, positions, side="right")
        return slot, positions - (ends[slot] - np.asarray(self.counts)[slot])

    @property
    def left_out(self) -> int:
        return int(sum(self.counts)) - len(self.order)


def epoch_plan(
    counts: Sequence[int],
    *,
    world: int,
    rank: int,
    k: int,
    w: int,
    batch_size: int,
    batches: int,
    batches_done: int,
    buffer: int,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """Reader ``w`` of ``rank``: what it reads in ``epoch``, from the position after ``batches_done`` batches."""
    g = rank * k + w
    shards = readers_shards(counts, world * k, seed, epoch)[g]
    mine = [int(counts[s]) for s in shards]
    share = reader_share(batches * batch_size, k, w)
    order = emission_order(sum(mine), buffer, seed, epoch, g)[:share]
    return EpochPlan(shards, mine, order, reader_share(batches_done * batch_size, k, w))
