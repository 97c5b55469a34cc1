"""Analytic multiply-accumulate (MAC) counts of one forward pass.

:func:`count_macs` runs one forward pass of a 1-image zero batch under forward hooks and adds up:

- every call of an ``nn.Linear``: in_features * out_features per output row (token or batch row);
- every call of an ``nn.Conv1d`` / ``nn.Conv2d``: (in_channels / groups) * kernel elements per output
  element;
- the work of any module that defines ``extra_macs(inputs, output) -> int``, called with the module's
  positional inputs (a tuple) and its output. A module reports there what it computes outside calls of
  the modules above: DiT's attention matmuls (2 * B * N^2 * D, see
  :meth:`ssm_tread.models.dit.Attention.extra_macs`), the selective scan of a Mamba mixer
  (:func:`selective_scan_macs`), a convolution applied functionally through a module's weight.

Element-wise work (norms, activations, modulation, softplus/exp of the selective scan's discretisation) is not
counted, like the published DiT figures ("GFLOPs" that are MACs of linears, convs and attention).
Embedding lookups cost nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ssm_tread.models.layers import to_2tuple


def selective_scan_macs(batch: int, length: int, d_inner: int, d_state: int) -> int:
    """MACs of a selective scan over ``length`` steps: per batch, step, channel and state one MAC for the
    state update ``h = exp(dt*A) * h + (dt*B) * x`` and one for the readout ``y += C * h``:
    2 * batch * length * d_inner * d_state."""
    return 2 * batch * length * d_inner * d_state


def _module_macs(module: nn.Module, inputs: tuple, output) -> int:
    macs = 0
    if isinstance(module, nn.Linear):
        rows = output.numel() // module.out_features
        macs += rows * module.in_features * module.out_features
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        macs += output.numel() * per_output
    if hasattr(module, "extra_macs"):
        macs += int(module.extra_macs(inputs, output))
    return macs


def count_macs(model: nn.Module, routed: bool) -> int:
    """MACs of one forward pass of ``model`` on a batch of one image.

    ``routed=False``: the full-sequence (evaluation) forward. ``routed=True``: the training-time routed
    forward, with every route of ``model.router`` taken (run in eval mode inside ``router.forced()``, so
    label dropout is off; token counts per route are fixed, so the count is deterministic).

    The model may live on the meta device (no weights needed). Its mode is restored afterwards.
    """
    parameter = next(model.parameters())
    height, width = to_2tuple(model.input_size)
    x = torch.zeros(1, model.in_channels, height, width, device=parameter.device, dtype=parameter.dtype)
    t = torch.zeros(1, device=parameter.device)
    y = torch.zeros(1, dtype=torch.long, device=parameter.device)

    total = 0

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        nonlocal total
        total += _module_macs(module, inputs, output)

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if routed:
                with model.router.forced():
                    model(x, t, y)
            else:
                model(x, t, y)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
