"""Keeping the model busy: how an encoding job splits the machine between decoding and the forward pass.

Decoding runs in DataLoader worker processes ahead of the model (a bounded queue of decoded clips), so the
forward pass never waits for a file that could have been decoded while the previous batch ran. Both sides use
threads, and on a small CPU they fight: every torch op of a worker would start its own OpenMP team, and a
model thread pre-empted by a decoder stalls the other model threads at the next barrier. So the budget is
explicit: the model gets the cores (its own process's torch threads), each decoding worker one thread for
torch and one for the codec, and on the CPU the workers run at a lower scheduling priority, which lets them
fill the gaps the model leaves (Python overhead, single-threaded ops) rather than pre-empt it.

On a GPU the forward pass needs one CPU thread to launch kernels; the other cores decode.

Batches are sized for the model: enough rows (clips x frames x tokens) per forward pass that the matmuls run
at full speed, and no more, so the first batch starts early and the queue stays short.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["ThreadBudget", "encode_batch_size", "thread_budget"]

DECODE_NICENESS = 10  # workers yield to the model's threads on a CPU (never applied to the main process)
CPU_ROWS_PER_BATCH = (
    2048  # token rows per forward pass from which a CPU GEMM is at its peak (ViT-B/32 x 12 frames: 4 clips)
)
CUDA_ROWS_PER_BATCH = 65536
PREFETCH_PER_WORKER = 4  # decoded chunks queued per worker: one file each, ahead of the model


def available_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadBudget:
    """How many threads the model and the decoding workers use (see the module docstring)."""

    model_threads: int
    decode_workers: int
    niceness: int  # added to each decoding worker's scheduling priority

    def init_worker(self, worker_id: int) -> None:
        """DataLoader `worker_init_fn`: one torch thread (the DataLoader already sets it) and the niceness."""
        torch.set_num_threads(1)
        if self.niceness:
            with contextlib.suppress(OSError, AttributeError):
                os.nice(self.niceness)

    @contextlib.contextmanager
    def model_threads_set(self) -> Iterator[None]:
        """torch's intra-op threads at `model_threads` inside, the previous count restored after."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.model_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def thread_budget(device: torch.device, workers: int | None, processes_per_node: int = 1) -> ThreadBudget:
    """The split for one encoding process on ``device``; ``workers=None`` chooses the number of decoders.

    ``processes_per_node`` (torchrun's LOCAL_WORLD_SIZE) shares the cores between the ranks of one machine.
    On a CPU, one decoder: decoding a clip costs less than encoding it with a ViT, and a second decoder only
    takes cores from the model. On a GPU every core but the launcher's decodes.
    """
    cores = max(1, available_cores() // max(1, processes_per_node))
    if device.type == "cuda":
        decoders = max(1, cores - 1) if workers is None else workers
        return ThreadBudget(model_threads=1, decode_workers=decoders, niceness=0)
    decoders = 1 if workers is None else workers
    return ThreadBudget(
        model_threads=cores, decode_workers=decoders, niceness=DECODE_NICENESS if decoders else 0
    )


def encode_batch_size(rows_per_clip: int, device: torch.device, limit: int) -> int:
    """Clips per forward pass: enough token rows for full-speed matmuls on ``device``, at most ``limit``."""
    target = CUDA_ROWS_PER_BATCH if device.type == "cuda" else CPU_ROWS_PER_BATCH
    return max(1, min(limit, -(-target // max(1, rows_per_clip))))
