"""Defaults sized to the machine: the CPUs this process may use, the ranks sharing them, and the work at hand."""
from __future__ import annotations

import math
import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (what a container or a batch scheduler grants),
    else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def node_ranks() -> int:
    """The ranks sharing this node's CPUs: torchrun's LOCAL_WORLD_SIZE (WORLD_SIZE counts every node's)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


def loader_workers(world: int = 1, most: int = 4) -> int:
    """Data-loader worker processes per rank: the CPUs each of ``world`` ranks has besides its own, at most
    ``most``; 0 (load in the rank's process) when a rank has one CPU or less."""
    return max(0, min(most, usable_cpus() // world - 1))


def share(size: int, n: int, world: int) -> int:
    """A chunk size (a sampling batch, a shard) of at most ``size`` that gives each of ``world`` ranks a part
    of ``n`` items: min(size, ceil(n / world)), at least 1."""
    return max(1, min(size, math.ceil(n / world)))
