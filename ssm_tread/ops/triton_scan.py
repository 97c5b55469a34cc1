"""The selective scan as Triton kernels: forward and backward, for GPUs without the mamba-ssm build.

Each program owns one batch element and a block of ``BLOCK_E`` channels of one group of B/C, and walks
L in chunks of ``CHUNK`` steps. Inside a chunk it loops over the N states; for state n the recurrence
over the chunk's [BLOCK_E, CHUNK] tile is one associative scan of the affine maps h -> a_t h + b_t:

    forward     h_t = a_t h_{t-1} + dt_t B_t u_t            a_t = exp(dt_t A)
    backward    w_t = C_t dy_t + a_{t+1} w_{t+1}            w_t = dLoss/dh_t (a reverse scan)

The forward saves only the state entering each chunk ([b, chunks, E, N] float32); the backward walks
the chunks in reverse, recomputes the chunk's states from that saved state, and uses
a_t h_{t-1} = h_t - dt_t B_t u_t, so no state is ever divided by a decay. Sums over batch (A, D,
delta_bias) and over channels (B, C) are written per program and summed afterwards: deterministic.

Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported (triton's own library functions are defined at its import): how the tests run them.
"""

from __future__ import annotations

import functools
import math
import os

import torch

CHUNK = 64  # steps per chunk: the length of one in-register scan
BLOCK_E = 32  # channels per program
NUM_WARPS = 8


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


def _kernels():
    """(forward, backward) kernels; imported on first use, so that this module never needs triton."""
    from ssm_tread.ops.triton_kernels import scan_bwd_kernel, scan_fwd_kernel

    return scan_fwd_kernel, scan_bwd_kernel


def launch_config(channels_per_group: int, state: int, block_e: int = BLOCK_E, chunk: int = CHUNK) -> dict:
    """The block sizes a call uses: channels per program shrink to fit a small group."""
    return dict(
        BLOCK_E=min(block_e, triton_next_power_of_2(channels_per_group)),
        BLOCK_N=triton_next_power_of_2(state),
        CHUNK=chunk,
    )


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


class _TritonScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias) -> (y, h_L); see :func:`selective_scan_triton`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk, block_e):
        scan_fwd, _ = _kernels()
        batch, channels, length = u.shape
        state = A.shape[1]
        groups = math.lcm(B.shape[1], C.shape[1])
        per_group = channels // groups
        cfg = launch_config(per_group, state, block_e, chunk)
        chunks = -(-length // chunk)
        A = A.contiguous()
        y = torch.empty_like(u, memory_format=torch.contiguous_format)
        states = u.new_empty(batch, chunks, channels, state, dtype=torch.float32)
        last = u.new_empty(batch, channels, state, dtype=torch.float32)
        grid = (batch, groups, -(-per_group // cfg["BLOCK_E"]))
        zz = z if z is not None else u
        scan_fwd[grid](
            u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
            y, states, last,
            channels, state, length, per_group, groups // B.shape[1], groups // C.shape[1],
            *_strides(u, delta, zz, B, C),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            num_warps=NUM_WARPS, **cfg,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.cfg, ctx.grid = softplus, cfg, grid
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        _, scan_bwd = _kernels()
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, channels, length = u.shape
        state = A.shape[1]
        groups, blocks = ctx.grid[1], ctx.grid[2]
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y.contiguous()
        f32 = dict(dtype=torch.float32, device=u.device)
        grad_u, grad_delta = torch.empty_like(grad_y), torch.empty_like(grad_y, dtype=delta.dtype)
        grad_z = torch.empty_like(grad_y, dtype=z.dtype) if z is not None else None
        grad_A = torch.empty(batch, channels, state, **f32)
        grad_D = torch.empty(batch, channels, **f32) if D is not None else None
        grad_bias = torch.empty(batch, channels, **f32) if delta_bias is not None else None
        grad_B = torch.empty(batch, groups, blocks, state, length, **f32)
        grad_C = torch.empty_like(grad_B)
        zz = z if z is not None else u
        scan_bwd[ctx.grid](
            u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, states,
            grad_y, grad_last.contiguous() if grad_last is not None else A,
            grad_u, grad_delta, grad_z if z is not None else grad_u,
            grad_A, grad_D if D is not None else grad_A, grad_bias if delta_bias is not None else grad_A,
            grad_B, grad_C,
            channels, state, length, channels // groups, groups // B.shape[1], groups // C.shape[1],
            *_strides(u, delta, zz, B, C),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_DLAST=grad_last is not None, num_warps=NUM_WARPS, **ctx.cfg,
        )

        def coarse(grad, like):  # [b, G, blocks, N, L] -> like's [b, G_like, N, L], summing channel blocks
            grad = grad.sum(2)
            grad = grad.view(batch, like.shape[1], groups // like.shape[1], state, length).sum(2)
            return grad.to(like.dtype)

        return (
            grad_u,
            grad_delta,
            grad_A.sum(0).to(A.dtype),
            coarse(grad_B, B),
            coarse(grad_C, C),
            grad_D.sum(0).to(D.dtype) if D is not None else None,
            grad_z,
            grad_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            None,
            None,
            None,
        )


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """y [b, E, L] in u's dtype and the last state [b, E, N] float32. B, C are [b, G, N, L]. The
    module's CHUNK and BLOCK_E are read at each call (tests shrink them)."""
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, CHUNK, BLOCK_E)
