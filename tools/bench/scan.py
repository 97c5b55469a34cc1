"""Side-by-side timings of the selective-scan backends (forward + backward)."""

from __future__ import annotations

import statistics
import time

import torch

from ssm_tread.ops.selective_scan import mamba_ssm_scan_fn, selective_scan
from ssm_tread.ops.triton_scan import triton_available


def scan_inputs(batch: int, channels: int, state: int, length: int, device: str = "cpu", seed: int = 0) -> dict:
    """Inputs shaped and scaled as a Mamba mixer feeds them (D, z, delta_bias; softplus'd dt)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    return dict(
        u=randn(batch, channels, length),
        delta=randn(batch, channels, length),
        A=(-torch.arange(1.0, state + 1).repeat(channels, 1)).to(device).requires_grad_(),
        B=randn(batch, state, length),
        C=randn(batch, state, length),
        D=randn(channels),
        z=randn(batch, channels, length),
        delta_bias=randn(channels),
    )


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
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

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
