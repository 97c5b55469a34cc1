"""Pieces shared by the state-space backbones (DiM, ZigMa).

- :func:`mix_in_scan_order`: a mixer reads the tokens in front of it in the layer's scan order (the
  order restricted to the survivors while a route is in flight) and writes back to where they lay.
- :func:`attach_mixers`: the Mamba mixers are added to the blocks after the DiT-style initialisation
  of everything else, so their own initialisation (dt bias, A_log, D) is kept.
- :func:`scan_table`: the distinct scan orders of a schedule, stacked once, and each layer's row.

Shapes: B batch, L sequence length, K tokens in a route, D hidden size, h x w patch grid, p patch size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ssm_tread.routing import ScanIndex

MixerFactory = Callable[..., nn.Module]


def mix_in_scan_order(mixer: nn.Module, x: torch.Tensor, scan: ScanIndex) -> torch.Tensor:
    """x [B, L or K, D] as the tokens lie -> mixer over them in scan order -> [B, L or K, D] as they lie."""
    return scan.restore(mixer(scan.apply(x)))


def attach_mixers(blocks: nn.ModuleList, mixer_cls: MixerFactory, hidden_size: int, **mixer_kwargs) -> None:
    """Give every block its mixer ``mixer_cls(hidden_size, **mixer_kwargs)`` as ``block.mixer``."""
    for block in blocks:
        block.mixer = mixer_cls(hidden_size, **mixer_kwargs)


def scan_table(schedule: list[str], order_of: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack the distinct orders of ``schedule`` (layer i reads ``schedule[i]``) once.

    Returns ``orders`` [S, L] (``order_of(name)`` for the S distinct names, in order of first use) and
    ``rows`` (layer i reads ``orders[rows[i]]``). Layers sharing an order share its row, so the routing
    pass's per-order cache builds each restricted permutation once.
    """
    names = list(dict.fromkeys(schedule))
    return torch.stack([order_of(name) for name in names]), [names.index(name) for name in schedule]
