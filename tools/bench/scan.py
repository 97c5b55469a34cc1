"""Side-by-side timings of the selective-scan backends (forward + backward)."""

from __future__ import annotations

import statistics
import time

import torch

from ssm_tread.ops.selective_scan import mamba_ssm_scan_fn, selective_scan
from ssm_tread.ops.triton_scan import triton_available


def scan_inputs(batch: int, channels: int, state: int, length: int, device: str = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32, layout: str = "contiguous") -> dict:
    """Inputs shaped and scaled as a Mamba mixer feeds them (D, z, delta_bias; softplus'd dt); u, delta,
    B, C, z in ``dtype``, A, D, delta_bias in float32. ``layout="mixer"`` lays delta and z out as
    :class:`ssm_tread.models.mamba.Mamba` passes them: [b, E, L] views of [b, L, *] projections (time
    stride E and 2E), the rest contiguous."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "contiguous":
        delta, z = randn(batch, channels, length), randn(batch, channels, length)
    elif layout == "mixer":
        delta = randn(batch, length, channels).transpose(1, 2)
        z = randn(batch, length, 2 * channels)[..., channels:].transpose(1, 2)
    else:
        raise ValueError(f"layout must be 'contiguous' or 'mixer', got {layout!r}")
    inputs = dict(
        u=randn(batch, channels, length),
        delta=delta,
        A=-torch.arange(1.0, state + 1, device=device).repeat(channels, 1),
        B=randn(batch, state, length),
        C=randn(batch, state, length),
        D=randn(channels, dtype=torch.float32),
        z=z,
        delta_bias=randn(channels, dtype=torch.float32),
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


def time_passes(inputs: dict, backend: str, device: torch.device, warmup: int = 1, repeats: int = 5) -> dict:
    """Median seconds of the forward pass and of the backward pass alone (a fixed output gradient)."""
    grad = None
    forward, backward = [], []
    for i in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        _synchronize(device)
        middle = time.perf_counter()
        grad = torch.ones_like(y) if grad is None else grad
        y.backward(grad)
        _synchronize(device)
        if i >= warmup:
            forward.append(middle - start)
            backward.append(time.perf_counter() - middle)
    return {"forward": statistics.median(forward), "backward": statistics.median(backward)}


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def available_backends(device: str) -> list[str]:
    """The backends that run on ``device`` at GPU speed (triton under the CPU interpreter is left out)."""
    cuda = torch.device(device).type == "cuda"
    return ["reference", "torch"] + ["triton"] * (cuda and triton_available()) + ["mamba_ssm"] * (
        cuda and mamba_ssm_scan_fn() is not None
    )


def benchmark_scan(
    batch: int = 2,
    channels: int = 768,
    state: int = 16,
    length: int = 256,
    backends: list[str] | None = None,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
) -> dict[str, float]:
    """Median seconds of one forward + backward per backend; the backends take turns in each repeat."""
    backends = backends or available_backends(device)
    inputs = scan_inputs(batch, channels, state, length, device)

    def step(backend):
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        y.backward(torch.ones_like(y))
        _synchronize(device)

    for _ in range(warmup):
        for backend in backends:
            step(backend)
    times = {backend: [] for backend in backends}
    for _ in range(repeats):
        for backend in backends:
            start = time.perf_counter()
            step(backend)
            times[backend].append(time.perf_counter() - start)
    return {backend: statistics.median(t) for backend, t in times.items()}


def scan_table(times: dict[str, float]) -> str:
    """Markdown table: milliseconds and speed-up over the reference backend."""
    rows = ["| backend | fwd+bwd (ms) | speed-up vs reference |", "|---|---:|---:|"]
    for backend, seconds in times.items():
        ratio = f"{times['reference'] / seconds:.1f}x" if "reference" in times else "-"
        rows.append(f"| {backend} | {seconds * 1e3:.1f} | {ratio} |")
    return "\n".join(rows)
