"""Peak memory of one call, shared by the benchmark scripts (run them from the repository root).

CUDA: `max_memory_allocated` growth over the call. CPU: there is no allocator counter, and `ru_maxrss` is a
process-lifetime maximum, so a thread samples the RSS every 0.5 ms during the call and reports the growth
over the RSS before it.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable

import torch


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes_during(fn: Callable[[], object], device: str) -> int:
    """Bytes above the starting level at the peak of `fn()` on `device` ("cuda..." or CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    base = rss_now()
    high = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            high[0] = max(high[0], rss_now())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(high[0], rss_now()) - base
