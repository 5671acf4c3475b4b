"""Which process this is: the one place that asks ``torch.distributed`` for the rank and world size, and picks
this process's device.

The process group is the only source of truth: a process that has not joined one (a plain ``python`` run,
or torchrun before `stanvid.training.loop.setup_distributed`) is rank 0 of 1, whatever ``WORLD_SIZE`` says, so every
module agrees on who writes and who shards. `launch_world_size` is the one other question: how many processes
the launcher started, which a plan or a set-up made before the group is joined needs.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.distributed as dist

from stanvid.errors import ConfigError

__all__ = ["rank_world", "launch_world_size", "launch_env", "default_device", "leave_process_group"]


def rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default: the default group) when torch.distributed is initialised,
    else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def launch_world_size() -> int:
    """The number of processes of this launch: the process group's size once joined, else torchrun's
    ``WORLD_SIZE`` (1 for a plain ``python`` run), for planning and for deciding whether to start a group."""
    if dist.is_available() and dist.is_initialized():
        return rank_world()[1]
    world = launch_env("WORLD_SIZE", 1)
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} in the environment: a launch has at least one process")
    if world > 1 and not launch_env("RANK", 0) < world:
        raise ConfigError(f"RANK={launch_env('RANK', 0)} in the environment is not below WORLD_SIZE={world}")
    launch_env("LOCAL_RANK", 0)
    return world


def launch_env(name: str, default: int) -> int:
    """The launcher's variable ``name`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) as a
    whole number, ``default`` when unset; anything else is a `ConfigError` naming it, not a traceback."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not re.fullmatch(
        r"\s*[0-9]+\s*", value
    ):  # ASCII digits only (str.isdigit() takes "²", which int() refuses)
        raise ConfigError(
            f"{name}={value!r} in the environment is not a whole number (torchrun sets it; unset or fix it)"
        )
    return int(value)


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", launch_env("LOCAL_RANK", 0))
    return torch.device("cpu")


def leave_process_group(clean: bool = True) -> None:
    """Destroy the default process group; after a ``clean`` run, first wait until every rank is done with it.

    Without the barrier, a rank that finishes first tears down its gloo connections (and, on rank 0, the
    rendezvous store) while another is still using them, and that rank's gloo thread aborts the process
    (``terminate called without an active exception``, SIGABRT; seen here in about one of seven 2-rank test runs).
    After an error the other ranks may never arrive, so no barrier then."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
