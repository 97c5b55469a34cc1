"""What the ranks of a run exchange besides gradients: Python objects, and the RNG states of a checkpoint."""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (a collective every rank joins; [obj] for one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rng_state(generators: dict) -> dict:
    """This rank's global torch (and CUDA) RNG states and the states of ``generators``."""
    state = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    for key, generator in generators.items():
        generator.set_state(state[key])
