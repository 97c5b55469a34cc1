"""Causal depthwise conv1d: the ``causal_conv1d`` CUDA kernel when importable, else ``F.conv1d``."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

KERNEL_DEVICE = "cuda"
KERNEL_WIDTHS = (2, 3, 4)  # the widths causal-conv1d's CUDA kernel is compiled for


@functools.cache
def causal_conv1d_kernel():
    """The ``causal_conv1d`` package's ``causal_conv1d_fn``, or None where it cannot run.

    The package imports its compiled extension ``causal_conv1d_cuda`` at import time, so a missing
    package, a missing extension and one built against another torch (an undefined-symbol ImportError)
    all land here as "unavailable"; importing the extension by name checks it whatever the version."""
    try:
        import causal_conv1d_cuda  # noqa: F401
        from causal_conv1d import causal_conv1d_fn
    except Exception:
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
    channels, width = weight.shape
    on_kernel = x.device.type == KERNEL_DEVICE and width in KERNEL_WIDTHS
    kernel = causal_conv1d_kernel() if on_kernel else None
    if kernel is not None:
        # causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
        # final_states_out=None, activation=None): everything after weight by keyword
        return kernel(x, weight.contiguous(), bias=bias, activation=activation)
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=channels)
    return F.silu(y) if activation else y
