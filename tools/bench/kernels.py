"""Compile every Triton kernel of the project for a GPU architecture, on a machine without a GPU.

Each kernel is compiled with the arguments it gets at run time (the Mamba mixer's tensor layouts at the
DiM-L/2 and ZigMa-B/2 layer shapes, in float32 and bfloat16), specialised the way Triton's launcher
specialises them (integers equal to 1 become constants, multiples of 16 and tensors are marked
16-divisible). ptxas then reports registers, spill bytes and the launch's shared memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile

import torch

from ssm_tread.ops import triton_scan

# (label, E, L): Mamba mixer layers, E = 2 * hidden size, N = 16
LAYERS = (("DiM-L/2", 2048, 366), ("ZigMa-B/2", 1536, 256))
STATE = 16
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def mixer_inputs(channels: int, length: int, dtype: torch.dtype, batch: int = 2) -> dict:
    """Scan inputs laid out as :class:`ssm_tread.models.mamba.Mamba` passes them: u from the causal
    conv (contiguous), dt and z as [b, E, L] views of [b, L, *] projections, contiguous B and C, A, D
    and delta_bias in float32."""
    x_and_z = torch.zeros(batch, length, 2 * channels, dtype=dtype).transpose(1, 2)
    return dict(
        u=torch.zeros(batch, channels, length, dtype=dtype),
        delta=torch.zeros(batch, length, channels, dtype=dtype).transpose(1, 2),
        A=torch.zeros(channels, STATE),
        B=torch.zeros(batch, 1, STATE, length, dtype=dtype),
        C=torch.zeros(batch, 1, STATE, length, dtype=dtype),
        D=torch.zeros(channels),
        z=x_and_z[:, channels:],
        delta_bias=torch.zeros(channels),
    )


def scan_launches(channels: int, length: int, dtype: torch.dtype, mixer: bool = True) -> list:
    """[(kernel, launch)] of one scan, forward and backward: as the mixer calls it (D, z, delta_bias,
    softplus; no gradient for the last state), or with ``mixer=False`` the bare recurrence with a
    gradient for the last state."""
    forward_kernel, backward_kernel = triton_scan.scan_kernels()
    x = mixer_inputs(channels, length, dtype)
    if not mixer:
        x.update(D=None, z=None, delta_bias=None)
    forward, (y, states, last) = triton_scan.forward_launch(**x, softplus=mixer)
    grad_last = None if mixer else torch.zeros_like(last)
    backward, _ = triton_scan.backward_launch(forward, **x, states=states, grad_y=torch.zeros_like(y),
                                              grad_last=grad_last)
    return [(forward_kernel, forward), (backward_kernel, backward)]


def specialise(kernel, launch) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) for ``triton.compile``, as the launcher builds them."""
    signature, constants, attrs = {}, dict(launch.constants), {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in launch.constants:
        signature[name] = "constexpr"
    return signature, constants, attrs


def compile_with_usage(source, arch: int, options: dict):
    """``triton.compile`` into an empty cache (so that ptxas runs), with ptxas's own ``-v`` log parsed
    into (compiled kernel, registers, spill bytes stored + loaded)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        with knobs.cache.scope(), knobs.nvidia.scope():
            knobs.cache.dir = cache
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return compiled, registers, spills


def compile_kernels(arch: int, progress=print) -> list[dict]:
    """Compile every kernel at every run-time configuration for sm_``arch``; one result dict each."""
    from triton.compiler import ASTSource

    if triton_scan.interpreted():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile kernels (the interpreter has no compiler)")
    runs = [(f"{label} layer E={channels} L={length}, {DTYPES[dtype]}", scan_launches(channels, length, dtype))
            for label, channels, length in LAYERS for dtype in (torch.float32, torch.bfloat16)]
    runs.append(("bare scan (no D, z, delta_bias, softplus; last-state gradient) E=2048 L=366, fp32",
                 scan_launches(2048, 366, torch.float32, mixer=False)))
    options = " ".join(f"{k}={v}" for k, v in triton_scan.LAUNCH_OPTIONS.items())
    results = []
    for label, launches in runs:
        for kernel, launch in launches:
            signature, constants, attrs = specialise(kernel, launch)
            compiled, registers, spills = compile_with_usage(
                ASTSource(kernel, signature, constants, attrs), arch, triton_scan.LAUNCH_OPTIONS
            )
            blocks = " ".join(f"{k}={launch.constants[k]}" for k in ("BLOCK_E", "BLOCK_N", "CHUNK"))
            result = dict(kernel=kernel.fn.__name__, config=f"{label}, {blocks}, {options}", registers=registers,
                          spills=spills, shared=compiled.metadata.shared)
            progress(f"compiled {result['kernel']} for sm_{arch}: {result['config']}")
            results.append(result)
    return results


def kernel_table(results: list[dict], arch: int) -> str:
    rows = [
        f"Triton kernels compiled for sm_{arch} (registers per thread, spill bytes, shared memory bytes)",
        "",
        "| kernel | config | registers | spills | shared |",
        "|---|---|---:|---:|---:|",
    ]
    rows += [f"| {r['kernel']} | {r['config']} | {r['registers']} | {r['spills']} | {r['shared']} |" for r in results]
    return "\n".join(rows)


def write_json(results: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
