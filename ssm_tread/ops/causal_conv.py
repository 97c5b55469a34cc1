"""Causal depthwise conv1d: the ``causal_conv1d`` CUDA kernel when importable, else ``F.conv1d``."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def causal_conv1d_kernel():
    """The ``causal_conv1d`` package's ``causal_conv1d_fn``, or None when it cannot be imported."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # a missing package and a broken CUDA extension both mean "unavailable"
        return None
    return causal_conv1d_fn


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """x [B, E, L], weight [E, K], bias [E] -> [B, E, L]; out_t depends on x_{t-K+1..t} only."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"expected x [B, E, L] and weight [E, K], got x {list(x.shape)}, weight {list(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"expected bias [E] = [{x.shape[1]}], got {list(bias.shape)}")
    kernel = causal_conv1d_kernel() if x.is_cuda else None
    if kernel is not None:
        return kernel(x, weight, bias, activation)
    channels, width = weight.shape
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=channels)
    return F.silu(y) if activation else y
