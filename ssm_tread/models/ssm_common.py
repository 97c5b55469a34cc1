"""What the state-space backbones DiM and ZigMa share (each defines its own block).

- :func:`mix_in_scan_order`: a mixer reads the tokens in front of it in the layer's scan order (the
  order restricted to the survivors while a route is in flight) and writes back to where they lay.
- :func:`init_mamba_backbone`: the model-wide initialisation pass that the official DiM and ZigMa both
  apply (mamba-ssm's ``_init_weights``, called by github.com/CompVis/zigma and
  github.com/tyshiwo1/DiM-DiffusionMamba).
- :func:`scan_table`: the distinct scan orders of the layers' scans, stacked once, and each layer's row.

Shapes: B batch, L sequence length, K tokens in a route, D hidden size, h x w patch grid, p patch size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from ssm_tread.routing import ScanIndex

MixerFactory = Callable[..., nn.Module]


def mix_in_scan_order(mixer: nn.Module, x: torch.Tensor, scan: ScanIndex) -> torch.Tensor:
    """x [B, L or K, D] as the tokens lie -> mixer over them in scan order -> [B, L or K, D] as they lie."""
    return scan.restore(mixer(scan.apply(x)))


def init_mamba_backbone(model: nn.Module, depth: int) -> None:
    """The official model-wide pass: every Linear bias 0 except the mixers' ``dt_proj.bias`` (which
    sets the initial step sizes), every Embedding N(0, 0.02), and every mixer ``out_proj.weight``
    re-drawn kaiming-uniform(a=sqrt 5), i.e. U(+-1/sqrt E), then divided by sqrt(depth)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)
            if name.endswith("mixer.out_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(depth)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


def scan_table(scans: list[str], order_of: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack the distinct orders of ``scans`` (layer i reads ``scans[i]``) once.

    Returns ``orders`` [S, L] (``order_of(name)`` for the S distinct names, in order of first use) and
    ``rows`` (layer i reads ``orders[rows[i]]``). Layers sharing an order share its row, so the routing
    pass's per-order cache builds each restricted permutation once.
    """
    names = list(dict.fromkeys(scans))
    return torch.stack([order_of(name) for name in names]), [names.index(name) for name in scans]
