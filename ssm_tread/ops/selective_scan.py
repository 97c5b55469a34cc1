"""The Mamba-1 selective scan, with the semantics of mamba-ssm's ``selective_scan_fn``.

Per channel e and state n (A [E, N], dt = delta, optionally + delta_bias and softplus'd):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        h [batch, E, N], h_{-1} = 0
    y_t = <C_t, h_t> + D * u_t,   then y * silu(z) when z is given

Backends: ``mamba_ssm`` (the CUDA kernel, when importable and the tensors are on CUDA), ``triton``
(Triton kernels, :mod:`ssm_tread.ops.triton_scan`: CUDA tensors, or CPU ones under
``TRITON_INTERPRET=1``), ``torch`` (pure PyTorch with a hand-written backward, CPU and GPU) and
``reference`` (a plain loop over L). On CUDA the automatic choice is the first of mamba_ssm, triton
and torch that imports; elsewhere it is torch.
"""

from __future__ import annotations

import contextlib

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssm_tread.ops.triton_scan import interpreted, selective_scan_triton, triton_available

logger = logging.getLogger("ssm_tread.ops")

BACKENDS = ("mamba_ssm", "triton", "torch", "reference")
ENV_VAR = "SSM_TREAD_SCAN_BACKEND"
# mamba-ssm builds its CUDA extension only when asked to (MAMBA_KEEP_CUDA_BUILD, on its main branch since
# July 2026); without it selective_scan_fn imports but fails at the first call
INSTALL_HINT = (
    "MAMBA_KEEP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install -r requirements-cuda.txt --no-build-isolation"
)

_forced: str | None = None
_logged: set[tuple[str, str]] = set()


@functools.cache
def mamba_ssm_scan_fn():
    """mamba-ssm's ``selective_scan_fn``, or None where it cannot run.

    Its compiled extension ``selective_scan_cuda`` is imported by name: mamba-ssm's main branch imports it
    inside try/except and installs without it by default, so ``selective_scan_fn`` then imports fine and
    fails at its first call. A missing package, a missing extension and one built against another torch
    (an undefined-symbol ImportError) all mean "unavailable"."""
    try:
        import selective_scan_cuda
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None
    return selective_scan_fn if callable(getattr(selective_scan_cuda, "fwd", None)) else None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (None: back to automatic selection)."""
    global _forced
    _forced = None if name is None else _check_name(name)


def active_backend(device: torch.device | str) -> str:
    """The backend a call with tensors on ``device`` and ``backend=None`` uses."""
    device = torch.device(device)
    name = _forced or os.environ.get(ENV_VAR) or None
    if name is None:
        if device.type != "cuda":
            return "torch"
        if mamba_ssm_scan_fn() is not None:
            return "mamba_ssm"
        return "triton" if triton_available() else "torch"
    return check_backend(name, device)


def check_backend(name: str, device: torch.device | str) -> str:
    """``name`` if it can run on ``device``; a clear error otherwise."""
    device = torch.device(device)
    _check_name(name)
    if name == "mamba_ssm":
        if mamba_ssm_scan_fn() is None:
            raise RuntimeError(
                "the mamba_ssm selective-scan backend was requested but mamba_ssm or its CUDA extension "
                f"selective_scan_cuda cannot be imported; on a CUDA machine install both with: {INSTALL_HINT}"
            )
        if device.type != "cuda":
            raise RuntimeError(f"the mamba_ssm selective-scan backend needs CUDA tensors, got device {device}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError(
                "the triton selective-scan backend was requested but triton cannot be imported; "
                "it ships with CUDA builds of torch (or: pip install triton)"
            )
        if device.type != "cuda" and not interpreted():
            raise RuntimeError(
                f"the triton selective-scan backend needs CUDA tensors, got device {device}; "
                "set TRITON_INTERPRET=1 to run it (slowly) on CPU tensors"
            )
    return name


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    expected = (
        "expected u, delta, z [batch, E, L], A [E, N], B and C [batch, N, L] or [batch, G, N, L] "
        "with E divisible by G, D and delta_bias [E]"
    )
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"{expected}; got u {list(u.shape)}, A {list(A.shape)}")
    batch, channels, length = u.shape
    state = A.shape[1]
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{expected}; got u {list(u.shape)}, {name} {list(t.shape)}")
    if A.shape[0] != channels:
        raise ValueError(f"{expected}; got u {list(u.shape)}, A {list(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        ok = t.dim() in (3, 4) and t.shape[0] == batch and t.shape[-2:] == (state, length)
        if not ok or (t.dim() == 4 and channels % t.shape[1]):
            raise ValueError(f"{expected}; got u {list(u.shape)}, A {list(A.shape)}, {name} {list(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"{expected}; got u {list(u.shape)}, {name} {list(t.shape)}")


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """B or C as [batch, G, N, L] (G = 1 for [batch, N, L])."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, backend=None
):
    """y [batch, E, L] in u's dtype; with ``return_last_state`` also (y, h_L [batch, E, N] float32, or
    float64 for float64 inputs: the torch and reference backends compute in float32 at least)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = active_backend(u.device) if backend is None else check_backend(backend, u.device)
    if (name, u.device.type) not in _logged:
        _logged.add((name, u.device.type))
        logger.info("selective scan backend on %s: %s", u.device.type, name)
    if name == "mamba_ssm":
        return mamba_ssm_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "triton":
        y, last_state = selective_scan_triton(u, delta, A, _grouped(B), _grouped(C), D, z, delta_bias, delta_softplus)
        return (y, last_state) if return_last_state else y

    dtype = u.dtype
    u, delta, A, B, C = (at_least_fp32(t) for t in (u, delta, A, _grouped(B), _grouped(C)))
    if delta_bias is not None:
        delta = delta + at_least_fp32(delta_bias)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    scan = scan_reference if name == "reference" else scan_torch
    # fp32 scan even under autocast; "meta" (where count_macs runs large models for free) has no autocast
    if torch.amp.is_autocast_available(u.device.type):
        no_autocast = torch.autocast(u.device.type, enabled=False)
    else:
        no_autocast = contextlib.nullcontext()
    with no_autocast:
        y, last_state = scan(u, delta, A, B, C)
    if D is not None:
        y = y + at_least_fp32(D)[:, None] * u
    if z is not None:
        y = y * F.silu(at_least_fp32(z))
    y = y.to(dtype)
    return (y, last_state) if return_last_state else y


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or in float64 where it is float64: half-precision inputs are scanned in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def scan_reference(u, delta, A, B, C):
    """The bare recurrence, one step per token. u, delta [b, E, L], A [E, N], B, C [b, G, N, L] float32.
    Returns y [b, E, L] and the last state [b, E, N]."""
    batch, channels, length = u.shape
    B = B.repeat_interleave(channels // B.shape[1], dim=1)  # [b, E, N, L]
    C = C.repeat_interleave(channels // C.shape[1], dim=1)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # [b, E, 1]
        h = torch.exp(dt * A) * h + dt * B[:, :, :, t] * u[:, :, t, None]
        ys.append((h * C[:, :, :, t]).sum(-1))
    return torch.stack(ys, dim=-1), h


def scan_torch(u, delta, A, B, C, block=None, parallel=None):
    """Same as :func:`scan_reference`, vectorised, with a hand-written backward. L is processed in
    blocks of ``block`` steps (default 16 on CPU, 128 on GPU); within a block the recurrence runs step
    by step, or with ``parallel`` (default on GPU) as a log-depth doubling scan."""
    block = block or (128 if u.is_cuda else 16)
    parallel = u.is_cuda if parallel is None else parallel
    return _SelectiveScan.apply(u, delta, A, B, C, block, parallel)


def _linear_scan(v: torch.Tensor, a: torch.Tensor, reverse: bool = False, parallel: bool = False) -> torch.Tensor:
    """Along dim 0: v_t <- a_t * v_{t-1} + v_t, or with ``reverse`` v_t <- a_{t+1} * v_{t+1} + v_t.
    Overwrites v. ``parallel``: log2(L) doubling steps (Hillis-Steele) instead of L - 1 steps."""
    length = v.shape[0]
    if not parallel:
        vs, as_ = v.unbind(0), a.unbind(0)
        for t in range(length - 2, -1, -1) if reverse else range(1, length):
            vs[t].addcmul_(as_[t + 1] if reverse else as_[t], vs[t + 1] if reverse else vs[t - 1])
        return v
    # w[i] starts as a_{i+1}, the decay from step i to i + 1; each round doubles the span that v and w cover
    w = a[1:].clone()
    k = 1
    while k < length:
        if reverse:
            v[:-k] += w[: length - k] * v[k:]
            w[: length - 1 - k] = w[: length - 1 - k] * w[k:]
        else:
            v[k:] += w[k - 1 :] * v[:-k]
            w[k:] = w[k:] * w[:-k]
        k *= 2
    return v


def _layout(u, delta, A, B, C):
    """Time-major copies: dt, dtu [L, b, G, 1, Eg], A [G, N, Eg], B, C [L, b, G, N], where channel
    e = g * Eg + i and G is the least common multiple of the group counts of B and C."""
    channels = u.shape[1]
    groups = math.lcm(B.shape[1], C.shape[1])

    def fine(x):  # [b, Gx, N, L] -> [L, b, G, N]
        return x.repeat_interleave(groups // x.shape[1], dim=1).permute(3, 0, 1, 2).contiguous()

    dt = _time_major(delta, groups)
    A = A.reshape(groups, channels // groups, -1).transpose(1, 2).contiguous()
    return dt, dt * _time_major(u, groups), A, fine(B), fine(C)


def _time_major(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, E, L] -> contiguous [L, b, G, 1, E / G]."""
    batch, channels, length = x.shape
    return x.permute(2, 0, 1).contiguous().view(length, batch, groups, 1, channels // groups)


def _channel_major(x: torch.Tensor) -> torch.Tensor:
    """[L, b, G, 1, Eg] -> [b, E, L]."""
    return x.flatten(2).permute(1, 2, 0)


def _coarse(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, b, G, N] -> [b, groups, N, L], summing the G // groups copies of each group."""
    length, batch, fine, state = grad.shape
    return grad.view(length, batch, groups, fine // groups, state).sum(3).permute(1, 2, 3, 0)


def _block_states(dt, dtu, A, B, h0, parallel):
    """Decays a_t = exp(dt_t A) and states h_t [T, b, G, N, Eg] of a block of T steps after state h0."""
    a = torch.exp(dt * A)
    h = dtu * B.unsqueeze(-1)
    h[0].addcmul_(a[0], h0)
    return a, _linear_scan(h, a, parallel=parallel)


class _SelectiveScan(torch.autograd.Function):
    """(u, delta [b, E, L], A [E, N], B, C [b, G, N, L]) -> (y [b, E, L], h_L [b, E, N]), float32.

    Runs L in blocks, so that the [block, b, E, N] temporaries stay small. Saves the inputs and the
    state at each block start; the backward recomputes the states block by block."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, block, parallel):
        batch, channels, length = u.shape
        dt, dtu, A_, B_, C_ = _layout(u, delta, A, B, C)
        y = torch.empty_like(dt)  # [L, b, G, 1, Eg]
        h = dt.new_zeros(batch, *A_.shape)  # [b, G, N, Eg]
        starts = []
        for t in range(0, length, block):
            s = slice(t, t + block)
            starts.append(h)
            _, hs = _block_states(dt[s], dtu[s], A_, B_[s], h, parallel)
            torch.matmul(C_[s].unsqueeze(-2), hs, out=y[s])  # y_t = <C_t, h_t>
            h = hs[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        ctx.block, ctx.parallel, ctx.device_type = block, parallel, u.device.type
        ctx.set_materialize_grads(False)
        return _channel_major(y), h.transpose(-1, -2).reshape(batch, channels, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):
        with torch.autocast(ctx.device_type, enabled=False):
            grads = _scan_backward(*ctx.saved_tensors, grad_y, grad_last, ctx.block, ctx.parallel)
        return *grads, None, None


def _scan_backward(u, delta, A, B, C, starts, grad_y, grad_last, block, parallel):
    """Gradients for u, delta, A, B, C given those of y and of the last state (either may be None)."""
    dt, dtu, A_, B_, C_ = _layout(u, delta, A, B, C)
    batch, (groups, state, width) = u.shape[0], A_.shape
    gy = torch.zeros_like(dt) if grad_y is None else _time_major(grad_y, groups)
    carry = dt.new_zeros(batch, groups, state, width)  # a_{t+1} g_{t+1} from the block after
    if grad_last is not None:
        carry += grad_last.reshape(batch, groups, width, state).transpose(-1, -2)
    grad_dtu, grad_dt = torch.empty_like(dt), torch.empty_like(dt)
    grad_B, grad_C = torch.empty_like(B_), torch.empty_like(C_)
    grad_A = torch.zeros_like(A_)
    for k in reversed(range(len(starts))):
        s = slice(k * block, (k + 1) * block)
        a, h = _block_states(dt[s], dtu[s], A_, B_[s], starts[k], parallel)
        g = C_[s].unsqueeze(-1) * gy[s]  # g_t = dLoss/dh_t [T, b, G, N, Eg]
        g[-1] += carry
        g = _linear_scan(g, a, reverse=True, parallel=parallel)
        torch.matmul(h, gy[s].transpose(-1, -2), out=grad_C[s].unsqueeze(-1))
        torch.matmul(B_[s].unsqueeze(-2), g, out=grad_dtu[s])
        torch.matmul(g, dtu[s].transpose(-1, -2), out=grad_B[s].unsqueeze(-1))
        q = a.mul_(g)  # q_t = dLoss/d(dt_t A) = g_t a_t h_{t-1}
        carry = q[0].clone()
        q[1:] *= h[:-1]
        q[0] *= starts[k]
        torch.linalg.vecdot(q, A_, dim=-2, out=grad_dt[s].squeeze(-2))
        grad_A += (q * dt[s]).sum((0, 1))
    grad_dt.addcmul_(grad_dtu, _time_major(u, groups))
    grad_u = grad_dtu.mul_(dt)
    grad_A = grad_A.transpose(1, 2).reshape(A.shape)
    grad_B, grad_C = _coarse(grad_B, B.shape[1]), _coarse(grad_C, C.shape[1])
    return _channel_major(grad_u), _channel_major(grad_dt), grad_A, grad_B, grad_C
