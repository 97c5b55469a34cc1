"""The triton selective-scan backend, run by Triton's CPU interpreter, against a step-by-step loop
written here in float64: outputs, last state and every gradient. Chunks of 8 steps and blocks of 4
channels, so that small shapes cross chunk and block boundaries.

The interpreter must be switched on before triton is imported, and switching it on for the whole
session would reach every other test (and the processes they start), so the interpreter cases run in
one pytest subprocess with ``TRITON_INTERPRET=1``; in the main session they are skipped and
:func:`test_interpreter_cases` reports their result."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ssm_tread.ops import active_backend, selective_scan

pytest.importorskip("triton")
scan_module = importlib.import_module("ssm_tread.ops.selective_scan")
triton_scan = importlib.import_module("ssm_tread.ops.triton_scan")
CHUNK, BLOCK_E = 8, 4
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_PROBLEM = triton_scan.interpreter_problem()  # None, or why the interpreter cannot run here


@pytest.fixture
def interpreter(monkeypatch):
    if not INTERPRETED:
        pytest.skip("an interpreter case: run by test_interpreter_cases in a TRITON_INTERPRET=1 subprocess")
    if INTERPRETER_PROBLEM:
        pytest.skip(INTERPRETER_PROBLEM)
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    monkeypatch.setattr(triton_scan, "CHUNK", CHUNK)
    monkeypatch.setattr(triton_scan, "BLOCK_E", BLOCK_E)
    monkeypatch.setattr(triton_scan, "BACKWARD_BLOCK_E", BLOCK_E)


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba-1's selective scan one token and one channel group at a time, in float64."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, channels, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    B, C = (x.double() if x.dim() == 4 else x.double()[:, None] for x in (B, C))
    h = [u.new_zeros(batch, A.shape[1]) for _ in range(channels)]  # per channel [batch, N]
    ys = []
    for t in range(length):
        y_t = []
        for e in range(channels):
            b_t = B[:, e * B.shape[1] // channels, :, t]  # [batch, N]: the group of channel e
            c_t = C[:, e * C.shape[1] // channels, :, t]
            dt = delta[:, e, t, None]
            h[e] = torch.exp(dt * A[e]) * h[e] + dt * b_t * u[:, e, t, None]
            y_t.append((h[e] * c_t).sum(-1))
        ys.append(torch.stack(y_t, dim=1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, torch.stack(h, dim=1)


def make_inputs(batch, channels, state, length, b_groups=None, c_groups=None, extras=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(length * 100 + channels)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    def bc(groups):
        return randn(batch, state, length) if groups is None else randn(batch, groups, state, length)

    inputs = dict(
        u=randn(batch, channels, length),
        delta=randn(batch, channels, length, scale=0.5),
        A=(-torch.exp(torch.randn(channels, state, generator=g))).requires_grad_(),
        B=bc(b_groups),
        C=bc(c_groups),
    )
    if extras:
        inputs.update(D=randn(channels), z=randn(batch, channels, length), delta_bias=randn(channels, scale=0.5))
    return inputs


def weighted_grads(outputs, inputs, seed=1):
    """Gradients of a random linear function of the outputs (None entries are skipped). The weights are
    drawn on the CPU, the same for outputs on any device, and moved to each output's device."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs if o is not None)
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(inputs, grads))


def assert_close(actual, expected, rtol):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1e-6))


def check(inputs, softplus=True, use_y=True, use_last=True, rtol=1e-4):
    y, last = selective_scan(**inputs, delta_softplus=softplus, return_last_state=True, backend="triton")
    assert y.dtype == inputs["u"].dtype and last.dtype == torch.float32
    grads = weighted_grads((y if use_y else None, last if use_last else None), inputs)
    y_ref, last_ref = loop_scan(**inputs, delta_softplus=softplus)
    grads_ref = weighted_grads((y_ref if use_y else None, last_ref if use_last else None), inputs)
    assert_close(y, y_ref, rtol)
    assert_close(last, last_ref, rtol)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads_ref[name], rtol)


@pytest.mark.parametrize(
    "batch, channels, state, length, b_groups, c_groups",
    [
        (2, 3, 4, 1, None, None),  # one token; fewer channels than a block
        (1, 6, 5, 13, None, None),  # L not a multiple of the chunk; 6 channels = a full and a partial block
        (2, 8, 3, 20, 2, 2),  # grouped B and C, more than two chunks
        (1, 4, 2, 11, 4, 1),  # B one group per channel, C shared
        (2, 5, 3, 32, None, None),  # L a multiple of 16: u's rows used in place, not copied
    ],
)
def test_interpreted_triton_matches_loop(interpreter, batch, channels, state, length, b_groups, c_groups):
    check(make_inputs(batch, channels, state, length, b_groups, c_groups))


def test_interpreted_without_extras_or_softplus(interpreter):
    inputs = make_inputs(2, 5, 3, 17, extras=False)
    inputs["delta"] = inputs["delta"].detach().abs().requires_grad_()  # dt > 0 without softplus
    check(inputs, softplus=False)


@pytest.mark.parametrize("use_y, use_last", [(True, False), (False, True)])
def test_interpreted_only_output_or_only_last_state(interpreter, use_y, use_last):
    check(make_inputs(1, 4, 2, 10), use_y=use_y, use_last=use_last)


def test_interpreted_strided_inputs_as_the_mixer_passes_them(interpreter):
    """The Mamba mixer passes dt and z as [b, E, L] views of [b, L, *] projections (stride 1 along E)."""
    inputs = make_inputs(2, 6, 3, 19)
    for name in ("delta", "z"):
        inputs[name] = inputs[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert inputs["delta"].stride() == (19 * 6, 1, 6)
    check(inputs)


def test_interpreted_dense_transposed_u_without_an_output_gradient(interpreter):
    """u laid out [b, L, E] (dense, not contiguous) and a loss on the last state only: the zero output
    gradient the backward makes must be indexed as the kernel reads it."""
    inputs = make_inputs(2, 6, 3, 19)
    inputs["u"] = inputs["u"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    check(inputs, use_y=False)


def test_interpreted_softplus_of_very_negative_dt(interpreter):
    """softplus(x) ~ exp(x) far below 0: log(1 + exp(x)) in float32 is off by 1e-3 at -10 and 0 below -17."""
    inputs = make_inputs(1, 4, 3, 12, extras=False)
    inputs["delta"] = torch.linspace(-26.0, -9.0, 4 * 12).view(1, 4, 12).requires_grad_()
    inputs["u"] = inputs["u"].detach().mul(1e6).requires_grad_()  # y of order 1, not of order dt
    check(inputs)


def test_interpreted_bf16_inputs_keep_a_float32_state(interpreter):
    inputs = make_inputs(1, 4, 3, 12, dtype=torch.bfloat16)
    check(inputs, rtol=2e-2)


def test_weighted_grads_of_outputs_on_another_device():
    """The GPU test weighs CUDA outputs; the meta device stands in for CUDA here."""
    x = torch.ones(3, device="meta", requires_grad=True)
    assert weighted_grads((2 * x,), {"x": x})["x"].device.type == "meta"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(1, 2, 2, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        selective_scan(**inputs, backend="triton")


def test_cuda_prefers_mamba_ssm_then_triton_then_torch(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    monkeypatch.setattr(scan_module, "mamba_ssm_scan_fn", lambda: (lambda *args: "kernel"))
    assert active_backend("cuda") == "mamba_ssm"
    monkeypatch.setattr(scan_module, "mamba_ssm_scan_fn", lambda: None)
    assert active_backend("cuda") == "triton"
    monkeypatch.setattr(scan_module, "triton_available", lambda: False)
    assert active_backend("cuda") == "torch"
    monkeypatch.setenv(scan_module.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        active_backend("cuda")


@pytest.mark.parametrize("versions, broken", [(("3.6.0", "2.4.0"), True), (("3.6.0", "2.3.5"), False),
                                              (("3.8.0", "2.4.6"), False), (("3.7.0+git1a2b", "2.5.0"), False)])
def test_interpreter_problem_names_triton_before_3_7_with_numpy_2_4(monkeypatch, versions, broken):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", versions[0])
    monkeypatch.setattr(numpy, "__version__", versions[1])
    triton_scan.interpreter_problem.cache_clear()
    try:
        assert bool(triton_scan.interpreter_problem()) == broken
    finally:
        triton_scan.interpreter_problem.cache_clear()


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
@pytest.mark.skipif(bool(INTERPRETER_PROBLEM), reason=str(INTERPRETER_PROBLEM))
def test_interpreter_cases():
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_matches_loop(dtype):
    inputs = make_inputs(2, 64, 16, 300, dtype=dtype)
    cuda = {k: v.detach().cuda().requires_grad_() for k, v in inputs.items()}
    y, last = selective_scan(**cuda, delta_softplus=True, return_last_state=True, backend="triton")
    grads = weighted_grads((y, last), cuda)
    y_ref, last_ref = loop_scan(**inputs, delta_softplus=True)
    grads_ref = weighted_grads((y_ref, last_ref), inputs)
    rtol = 1e-3 if dtype == torch.float32 else 2e-2
    assert_close(y.cpu(), y_ref, rtol)
    assert_close(last.cpu(), last_ref, rtol)
    for name in inputs:
        assert_close(grads[name].cpu(), grads_ref[name], rtol)
