"""Sequence-mixing kernels: the selective scan and the causal depthwise conv1d; and the TF32 switch."""

import torch

from ssm_tread.ops.causal_conv import causal_conv1d
from ssm_tread.ops.selective_scan import BACKENDS, active_backend, selective_scan, set_backend


def allow_tf32() -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (training's ``train.tf32`` and sampling): the
    blocks that run in float32 under bf16 autocast (DiT's blocks after a route) then use tensor cores."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


__all__ = ["BACKENDS", "active_backend", "allow_tf32", "causal_conv1d", "selective_scan", "set_backend"]
