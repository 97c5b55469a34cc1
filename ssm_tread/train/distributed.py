"""What the ranks of a run exchange besides gradients: Python objects."""
from __future__ import annotations

import torch.distributed as dist


def gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (a collective every rank joins; [obj] for one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
