"""The training's random streams: their states in a checkpoint, and side work during training (sample grids,
evaluation) that must not move them."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def isolated_rng(device: torch.device | str):
    """Restore torch's global CPU generator (and ``device``'s, on CUDA) on exit: whatever runs inside, even
    model construction or label dropout drawing from them, leaves the training's draws as they were."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


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
