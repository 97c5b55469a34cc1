"""The selective scan as Triton kernels: forward and backward, for GPUs without the mamba-ssm build.

Each program owns one batch element and a block of ``BLOCK_E`` channels of one group of B/C, and walks
L in chunks of ``CHUNK`` steps. Inside a chunk it loops over the N states; for state n the recurrence
over the chunk's [BLOCK_E, CHUNK] tile is one associative scan of the affine maps h -> a_t h + b_t:

    forward     h_t = a_t h_{t-1} + dt_t B_t u_t            a_t = exp(dt_t A)
    backward    w_t = C_t dy_t + a_{t+1} w_{t+1}            w_t = dLoss/dh_t (backward in time)

The state passes from chunk to chunk through memory: each chunk's scans write the state leaving it
into ``states`` [b, chunks + 1, E, N] (float32; the last entry is the last state), which the next
chunk reads, so no state column is ever picked out of a register tile. The backward walks the
chunks in reverse, recomputes the chunk's states from that saved state, passes dLoss/dh back through
a small carry buffer the same way, and uses a_t h_{t-1} = h_t - dt_t B_t u_t, so no state is ever
divided by a decay. Sums over batch (A, D, delta_bias) are written per program and summed afterwards,
dA's per-program adds come in chunk order, and the channel blocks add their sums for B, C into one
[b, G, N, L] buffer with atomics, in no set order (as mamba-ssm does).

Layout, which decides the speed (tools/bench/kernels.py): Triton gives each thread consecutive time
steps (an in-thread scan, then few shuffles) only when it can prove the rows aligned and
contiguous. So u (and in the backward dt and z, which the mixer passes along channels) are copied
to rows padded to a multiple of 16 steps where they are not, and B, C to whole chunks with zeros,
so that every step loads them unmasked. The backward's tiles in reverse time order are read as runs
of steps forward in time, each turned around in registers (``triton_kernels.load_reversed``).

Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (triton's own library functions are defined at its import): how the tests run them.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import NamedTuple

import torch

CHUNK = 32  # steps per chunk: the length of one in-register scan (forward and backward)
BLOCK_E = 32  # channels per program of the forward
BACKWARD_BLOCK_E = 4  # and of the backward, which holds more tiles
# warps per program, and a register cap that keeps the backward at <= 168 registers in triton 3.6 too
# (3 warps a scheduler on an SM) without spilling: the lowest estimate of tools/bench/kernels.py's cost
# model among the sizes tried, in triton 3.6 and 3.8
FORWARD_OPTIONS, BACKWARD_OPTIONS = dict(num_warps=4), dict(num_warps=1, maxnreg=168)
SIZE_ARGS = 23  # both kernels end with E, N, L, the three group sizes and the 17 strides of u, delta, z, B, C


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", module.__version__).groups())


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None: before triton 3.7 it turns
    one-element arrays into Python integers, which numpy 2.4 refuses (triton-lang/triton#9171)."""
    import numpy
    import triton

    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                "(triton-lang/triton#9171): install numpy<2.4 or triton>=3.7")
    return None


def scan_kernels():
    """(forward, backward) kernels; imported on first use, so that this module never needs triton."""
    from ssm_tread.ops.triton_kernels import scan_bwd_kernel, scan_fwd_kernel

    return scan_fwd_kernel, scan_bwd_kernel


def launch_config(channels_per_group: int, state: int, block_e: int = BLOCK_E, chunk: int = CHUNK) -> dict:
    """The block sizes a call uses: channels per program shrink to fit a small group."""
    return dict(
        BLOCK_E=min(block_e, next_power_of_2(channels_per_group)),
        BLOCK_N=next_power_of_2(state),
        CHUNK=chunk,
    )


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x, or where its rows along time do not start at multiples of 16 elements (L = 366, routed
    lengths) a copy that does: a view of [..., L rounded up to 16]. Triton vectorises the row loads
    only when it knows them aligned, and the tile's layout (time steps per thread) follows them."""
    if x.stride(-1) == 1 and all(stride % 16 == 0 for stride in x.stride()[:-1]):
        return x
    padded = x.new_empty(*x.shape[:-1], -(-x.shape[-1] // 16) * 16)[..., : x.shape[-1]]
    return padded.copy_(x)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **options, **constants)``, after copies that moved
    ``copied_bytes`` (read and written) to align rows."""

    grid: tuple[int, int, int]
    args: tuple
    constants: dict
    options: dict
    copied_bytes: int = 0


def chunk_padded(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """B or C [b, G, N, L] as a contiguous copy with zeros up to a whole number of chunks (and of 16
    steps): the kernels load their rows unmasked and vectorised."""
    padded = x.new_zeros(*x.shape[:-1], -(-x.shape[-1] // max(chunk, 16)) * max(chunk, 16))
    padded[..., : x.shape[-1]] = x
    return padded


def _align(chunk, B, C, *rows):
    """(B and C padded to whole chunks, then each of ``rows`` with aligned rows; bytes the copies read
    and wrote)."""
    tensors = (B, C, *rows)
    aligned = (chunk_padded(B, chunk), chunk_padded(C, chunk), *(aligned_rows(x) for x in rows))
    copied = sum(x.numel() * x.element_size() + y.numel() * y.element_size()
                 for x, y in zip(tensors, aligned) if x is not y)
    return aligned, copied


def forward_launch(u, delta, A, B, C, D, z, delta_bias, softplus, chunk=None, block_e=None):
    """The forward kernel's launch and its outputs: y [b, E, L] in u's dtype, the state entering each
    chunk and the one after the last, [b, chunks + 1, E, N], and the last state, a view of it [b, E, N]
    (float32). B, C are [b, G, N, L]."""
    chunk, block_e = chunk or CHUNK, block_e or BLOCK_E
    (B, C, u), copied = _align(chunk, B, C, u)
    batch, channels, length = u.shape
    state = A.shape[1]
    groups = math.lcm(B.shape[1], C.shape[1])
    per_group = channels // groups
    config = launch_config(per_group, state, block_e, chunk)
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    states = u.new_empty(batch, -(-length // chunk) + 1, channels, state, dtype=torch.float32)
    last = states[:, -1]
    zz = z if z is not None else u  # absent tensors: any pointer, never read
    args = (
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
        y, states,
        channels, state, length, per_group, groups // B.shape[1], groups // C.shape[1],
        *_strides(u, delta, zz, B, C),
    )
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus)
    grid = (batch, groups, -(-per_group // config["BLOCK_E"]))
    return Launch(grid, args, {**flags, **config}, FORWARD_OPTIONS, copied), (y, states, last)


def backward_launch(forward: Launch, u, delta, A, B, C, D, z, delta_bias, states, grad_y, grad_last):
    """The backward kernel's launch after ``forward``, and its outputs: gradients of u, delta, z
    (their dtypes), per batch element of A, D, delta_bias, and of B, C per group (float32). Here dt
    and z are copied to aligned rows too (the mixer passes them along channels): with both layouts in
    the kernel, Triton laid the state loop's tiles along channels and its scans crossed warps."""
    (B, C, u, delta, *z_), copied = _align(forward.constants["CHUNK"], B, C, u, delta, *([z] if z is not None else []))
    zz = z_[0] if z is not None else u  # absent tensors: any pointer, never read
    batch, channels, length = u.shape
    state = A.shape[1]
    groups = forward.grid[1]
    per_group = channels // groups
    config = launch_config(per_group, state, BACKWARD_BLOCK_E, forward.constants["CHUNK"])
    blocks = -(-per_group // config["BLOCK_E"])
    f32 = dict(dtype=torch.float32, device=u.device)
    carry = torch.zeros(2, batch, channels, state, **f32)  # the kernel's carries between chunks
    if grad_last is not None:
        carry[0] = grad_last
    grads = dict(
        u=torch.empty_like(grad_y),
        delta=torch.empty_like(grad_y, dtype=delta.dtype),
        z=torch.empty_like(grad_y, dtype=z.dtype) if z is not None else None,
        A=torch.zeros(batch, channels, state, **f32),
        D=torch.empty(batch, channels, **f32) if D is not None else None,
        delta_bias=torch.empty(batch, channels, **f32) if delta_bias is not None else None,
        B=torch.zeros(batch, groups, state, length, **f32),
        C=torch.zeros(batch, groups, state, length, **f32),
    )
    args = (
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, states,
        grad_y, carry,
        grads["u"], grads["delta"], grads["z"] if z is not None else grads["u"],
        grads["A"], grads["D"] if D is not None else grads["A"],
        grads["delta_bias"] if delta_bias is not None else grads["A"],
        grads["B"], grads["C"],
        *forward.args[-SIZE_ARGS:-17], *_strides(u, delta, zz, B, C),
    )
    grid = (batch, groups, blocks)
    return Launch(grid, args, {**forward.constants, **config}, BACKWARD_OPTIONS, copied), grads


class _TritonScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias) -> (y, h_L); see :func:`selective_scan_triton`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk, block_e):
        scan_fwd, _ = scan_kernels()
        A = A.contiguous()
        launch, (y, states, last) = forward_launch(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, block_e)
        scan_fwd[launch.grid](*launch.args, **launch.options, **launch.constants)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.launch = launch._replace(args=launch.args[-SIZE_ARGS:])  # no reference to y
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        _, scan_bwd = scan_kernels()
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch = u.shape[0]
        groups = ctx.launch.grid[1]
        if grad_y is None:  # a loss on the last state only; the kernel reads dy as contiguous
            grad_y = torch.zeros_like(u, memory_format=torch.contiguous_format)
        grad_y = grad_y.contiguous()
        grad_last = grad_last.contiguous() if grad_last is not None else None
        launch, grads = backward_launch(ctx.launch, u, delta, A, B, C, D, z, delta_bias, states, grad_y, grad_last)
        scan_bwd[launch.grid](*launch.args, **launch.options, **launch.constants)

        def coarse(grad, like):  # [b, G, N, L] -> like's [b, G_like, N, L]
            grad = grad.view(batch, like.shape[1], groups // like.shape[1], *grad.shape[-2:]).sum(2)
            return grad.to(like.dtype)

        def over_batch(name, like):
            return grads[name].sum(0).to(like.dtype) if like is not None else None

        return (
            grads["u"], grads["delta"], over_batch("A", A), coarse(grads["B"], B), coarse(grads["C"], C),
            over_batch("D", D), grads["z"], over_batch("delta_bias", delta_bias), None, None, None,
        )


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """y [b, E, L] in u's dtype and the last state [b, E, N] float32. B, C are [b, G, N, L]. The
    module's CHUNK, BLOCK_E and BACKWARD_BLOCK_E are read at each call (tests shrink them)."""
    if interpreted() and interpreter_problem():
        raise RuntimeError(interpreter_problem())
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, CHUNK, BLOCK_E)
