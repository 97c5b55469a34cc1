"""Sequence-mixing kernels: the selective scan and the causal depthwise conv1d."""

from ssm_tread.ops.causal_conv import causal_conv1d
from ssm_tread.ops.selective_scan import BACKENDS, active_backend, selective_scan, set_backend

__all__ = ["BACKENDS", "active_backend", "causal_conv1d", "selective_scan", "set_backend"]
