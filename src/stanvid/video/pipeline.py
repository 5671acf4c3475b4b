"""Keeping the model busy: how an encoding job splits the machine between decoding and the forward pass.

Both sides are compute: decoding 12 frames out of a 20 s 640x360 H.264 file costs about as much CPU as encoding
the clip with ViT-B/32 + STAN in bf16 (benchmarks/index.py --pipeline prints both). So the split is explicit:

- With a GPU, or enough cores that giving some to decoding costs the model little, decoding runs in DataLoader
  worker processes ahead of the model (a bounded queue of decoded files), each worker with one thread for torch
  and one for the codec, and the model keeps the other cores (on a GPU it needs one thread to launch kernels).
- On a small CPU (fewer than `MIN_CORES_TO_OVERLAP` cores) decoding and the forward pass alternate in the main
  process, each with every core: the decoder splits a file's keyframe segments over threads, the model its
  matmuls. Overlapping them there was measured slower (0.79-0.84 against 1.10 videos/s on 2 cores, one
  decoding worker with and without a lower priority, same run): both sides are compute-bound on the same two
  cores, so overlap gains nothing while every model thread a decoder pre-empts stalls the others at the next
  barrier.

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

MIN_CORES_TO_OVERLAP = 4  # below this, decoding and the model alternate on a CPU (see the module docstring)
CPU_CORES_PER_DECODER = 8  # above it, one decoding worker per 8 cores
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
    decode_workers: int  # 0: decode in the encoding process, between forward passes, with every core

    def init_worker(self, worker_id: int) -> None:
        """DataLoader `worker_init_fn`: one torch thread per worker (the codec gets one from `read_frames`)."""
        torch.set_num_threads(1)

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
    An explicit ``workers`` is obeyed; on a CPU the model then keeps the cores the workers do not take, or all
    of them on a small CPU (where taking one would halve it).
    """
    cores = max(1, available_cores() // max(1, processes_per_node))
    if device.type == "cuda":
        decoders = max(1, cores - 1) if workers is None else workers
        return ThreadBudget(model_threads=1, decode_workers=decoders)
    if workers is None:
        workers = 0 if cores < MIN_CORES_TO_OVERLAP else max(1, cores // CPU_CORES_PER_DECODER)
    model_threads = cores if cores < MIN_CORES_TO_OVERLAP else max(1, cores - workers)
    return ThreadBudget(model_threads=model_threads, decode_workers=workers)


def encode_batch_size(rows_per_clip: int, device: torch.device, limit: int) -> int:
    """Clips per forward pass: enough token rows for full-speed matmuls on ``device``, at most ``limit``."""
    target = CUDA_ROWS_PER_BATCH if device.type == "cuda" else CPU_ROWS_PER_BATCH
    return max(1, min(limit, -(-target // max(1, rows_per_clip))))
