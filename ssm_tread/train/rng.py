"""Side work during training (sample grids, evaluation) must not move the training's random streams."""
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
