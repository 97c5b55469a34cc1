"""The selective scan: the torch backend against the step-by-step reference (outputs, last state, every
gradient), the reference against closed forms, and backend selection."""

import importlib
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ssm_tread.ops import active_backend, selective_scan, set_backend
from tools.bench.scan import benchmark_scan, scan_table

scan_module = importlib.import_module("ssm_tread.ops.selective_scan")
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def automatic_backend(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    set_backend(None)
    yield
    set_backend(None)


def make_inputs(batch, channels, state, length, groups=None, extras=True, seed=0, dtype=torch.float32):
    """Random inputs in the ranges Mamba produces (dt around softplus(0), A negative)."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    inputs = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * 0.5,
        "A": -torch.exp(randn(channels, state)),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
    }
    if extras:
        inputs.update(D=randn(channels), z=randn(batch, channels, length), delta_bias=randn(channels) * 0.5)
    return {k: v.requires_grad_() for k, v in inputs.items()}


def run(inputs, backend, softplus=True, seed=1, last_state_grad=True):
    """Outputs, last state and the gradients of a random linear function of both (of y alone without
    ``last_state_grad``: mamba-ssm's selective_scan_fn ignores the last state's gradient by design)."""
    y, last = selective_scan(**inputs, delta_softplus=softplus, return_last_state=True, backend=backend)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=g).to(t.device) for t in (y, last)]
    loss = (y * weights[0]).sum()
    if last_state_grad:
        loss = loss + (last * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return y, last, dict(zip(inputs, grads))


def assert_close(actual, expected, rtol=1e-4):
    """Equal up to rtol relative to the largest magnitude of ``expected``."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6))


def assert_backends_agree(inputs, softplus=True):
    y_ref, last_ref, grads_ref = run(inputs, "reference", softplus)
    y, last, grads = run(inputs, "torch", softplus)
    assert y.dtype == inputs["u"].dtype and last.dtype == torch.float32
    assert_close(y, y_ref)
    assert_close(last, last_ref)
    for name in inputs:
        assert_close(grads[name], grads_ref[name])


@pytest.mark.parametrize(
    "batch, channels, state, length, groups",
    [
        (2, 8, 4, 1, None),  # a single token
        (1, 4, 3, 32, None),  # a whole number of CPU blocks
        (2, 6, 5, 37, None),  # L not a multiple of the block
        (2, 8, 4, 70, 2),  # grouped B and C, three blocks
        (1, 8, 2, 19, 8),  # one channel per group
    ],
)
@pytest.mark.parametrize("extras", [True, False])
def test_torch_matches_reference(batch, channels, state, length, groups, extras):
    assert_backends_agree(make_inputs(batch, channels, state, length, groups, extras))


@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([None, 1, 2, 3]),
    per_group=st.integers(1, 4),
    state=st.integers(1, 8),
    length=st.integers(1, 80),
    use=st.sets(st.sampled_from(["D", "z", "delta_bias"])),
    softplus=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30, deadline=None)
def test_torch_matches_reference_on_random_shapes(batch, groups, per_group, state, length, use, softplus, seed):
    inputs = make_inputs(batch, (groups or 1) * per_group, state, length, groups, seed=seed)
    inputs = {k: v for k, v in inputs.items() if k not in ("D", "z", "delta_bias") or k in use}
    if not softplus:  # dt must stay positive for a decaying scan
        for name in ("delta", "delta_bias"):
            if name in inputs:
                inputs[name] = inputs[name].detach().abs().requires_grad_()
    assert_backends_agree(inputs, softplus)


@pytest.mark.parametrize("block", [1, 5, 16])
@pytest.mark.parametrize("parallel", [False, True])
def test_torch_blocks_and_parallel_scan(block, parallel):
    """The blocked and the log-depth (GPU default) in-block scans, run on CPU."""
    inputs = make_inputs(2, 6, 3, 45, groups=3, extras=False)
    inputs["delta"] = F.softplus(inputs["delta"].detach()).requires_grad_()
    args = [inputs[k] for k in ("u", "delta", "A")] + [inputs["B"], inputs["C"]]
    expected = scan_module.scan_reference(*args)
    actual = scan_module.scan_torch(*args, block=block, parallel=parallel)
    weights = [torch.randn_like(t) for t in expected]
    grads_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, expected)), args)
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, actual)), args)
    for a, e in zip((*actual, *grads), (*expected, *grads_ref)):
        assert_close(a, e)


def test_torch_backward_passes_gradcheck():
    inputs = make_inputs(1, 4, 3, 11, groups=2, extras=False, dtype=torch.float64)
    inputs["delta"] = F.softplus(inputs["delta"].detach()).requires_grad_()
    args = tuple(inputs[k] for k in ("u", "delta", "A", "B", "C"))
    assert torch.autograd.gradcheck(lambda *xs: scan_module.scan_torch(*xs, block=4), args)


def test_only_last_state_or_only_output_used():
    inputs = make_inputs(2, 4, 3, 9, extras=False)
    for backend in ("reference", "torch"):
        y, last = selective_scan(**inputs, return_last_state=True, backend=backend)
        (grad_last,) = torch.autograd.grad(last.sum(), [inputs["u"]], retain_graph=True)
        (grad_y,) = torch.autograd.grad(y.sum(), [inputs["u"]])
        if backend == "reference":
            expected = grad_last, grad_y
        else:
            assert_close(grad_last, expected[0])
            assert_close(grad_y, expected[1])


def test_reference_geometric_series():
    """Constant inputs: h_t = dt * sum_{k<=t} r^k with r = exp(dt * a)."""
    length, dt, a, d, z = 6, 0.3, -0.7, 0.5, 1.2
    bias, raw = 0.1, math.log(math.expm1(0.3)) - 0.1  # softplus(raw + bias) = dt
    r = math.exp(dt * a)
    silu_z = z / (1 + math.exp(-z))
    expected = [(dt * (1 - r ** (t + 1)) / (1 - r) + d) * silu_z for t in range(length)]
    ones = torch.ones(1, 1, length)
    y, last = selective_scan(
        ones, torch.full((1, 1, length), raw), torch.tensor([[a]]), ones, ones, D=torch.tensor([d]),
        z=torch.full((1, 1, length), z), delta_bias=torch.tensor([bias]), delta_softplus=True,
        return_last_state=True, backend="reference",
    )
    torch.testing.assert_close(y[0, 0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[0, 0, 0].item(), dt * (1 - r**length) / (1 - r), rtol=1e-5, atol=1e-6)


def test_reference_states_and_groups_by_hand():
    """Two states with different decays read out by C; channels 0-1 use group 0, channels 2-3 group 1,
    with B[g, n] = (g + 1) * (n + 1)."""
    length, dt, decays, readout = 4, 0.5, (-1.0, -2.0), (1.0, -3.0)
    A = torch.tensor([decays]).repeat(4, 1)
    B = torch.tensor([[1.0, 2.0], [2.0, 4.0]])[None, :, :, None].expand(1, 2, 2, length)
    C = torch.tensor(readout)[None, None, :, None].expand(1, 2, 2, length)
    u = torch.arange(1.0, 5.0)[None, :, None].expand(1, 4, length)
    y = selective_scan(u, torch.full((1, 4, length), dt), A, B, C, backend="reference")
    for e in range(4):
        for t in range(length):
            expected = 0.0
            for n, (a, c) in enumerate(zip(decays, readout)):
                b = (e // 2 + 1) * (n + 1)
                expected += c * sum(math.exp(dt * a * (t - s)) * dt * b * (e + 1) for s in range(t + 1))
            assert y[0, e, t].item() == pytest.approx(expected, rel=1e-5)


def test_output_dtype_follows_u():
    inputs = {k: v.detach().bfloat16() for k, v in make_inputs(1, 4, 2, 5).items()}
    inputs["A"] = inputs["A"].float()
    for backend in ("reference", "torch"):
        y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
        assert y.dtype == torch.bfloat16 and last.dtype == torch.float32 and y.shape == (1, 4, 5)


def test_automatic_and_forced_selection(monkeypatch, caplog):
    assert active_backend("cpu") == "torch"
    set_backend("reference")
    assert active_backend("cpu") == "reference"
    set_backend(None)
    monkeypatch.setenv(scan_module.ENV_VAR, "reference")
    assert active_backend("cpu") == "reference"
    monkeypatch.setattr(scan_module, "_logged", set())
    inputs = make_inputs(1, 2, 2, 3, extras=False)
    with caplog.at_level(logging.INFO, logger="ssm_tread.ops"):
        selective_scan(**inputs)
        selective_scan(**inputs)
    assert [r.getMessage() for r in caplog.records] == ["selective scan backend on cpu: reference"]


def test_mamba_ssm_is_chosen_only_for_cuda(monkeypatch):
    monkeypatch.setattr(scan_module, "mamba_ssm_scan_fn", lambda: (lambda *args: "kernel"))
    assert active_backend("cuda") == "mamba_ssm"
    assert active_backend("cpu") == "torch"
    set_backend("mamba_ssm")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**make_inputs(1, 2, 2, 3, extras=False))


def test_forcing_unavailable_mamba_ssm_names_the_install_command(monkeypatch):
    monkeypatch.setattr(scan_module, "mamba_ssm_scan_fn", lambda: None)
    inputs = make_inputs(1, 2, 2, 3, extras=False)
    hint = "pip install -r requirements-cuda.txt --no-build-isolation"  # after the build flags
    with pytest.raises(RuntimeError, match=hint):
        selective_scan(**inputs, backend="mamba_ssm")
    monkeypatch.setenv(scan_module.ENV_VAR, "mamba_ssm")
    with pytest.raises(RuntimeError, match=hint):
        selective_scan(**inputs)


def test_unknown_backend_lists_valid_names(monkeypatch):
    for call in (lambda: set_backend("cuda"), lambda: selective_scan(**make_inputs(1, 2, 2, 3), backend="cutlass")):
        with pytest.raises(ValueError, match="mamba_ssm, triton, torch, reference"):
            call()
    monkeypatch.setenv(scan_module.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="valid backends"):
        active_backend("cpu")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("delta", (2, 4, 6)),
        ("z", (2, 4, 5, 1)),
        ("A", (4,)),
        ("A", (3, 2)),
        ("B", (2, 3, 5)),
        ("C", (2, 2, 4)),
        ("B", (2, 3, 2, 5)),  # 3 groups do not divide 4 channels
        ("D", (2,)),
        ("delta_bias", (4, 1)),
    ],
)
def test_bad_shapes_are_rejected(name, shape):
    inputs = {k: v.detach() for k, v in make_inputs(2, 4, 2, 5).items()}
    inputs[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"expected u, delta, z \[batch, E, L\]"):
        selective_scan(**inputs)


def test_benchmark_times_every_cpu_backend():
    times = benchmark_scan(batch=1, channels=4, state=2, length=5, warmup=0, repeats=1)
    assert set(times) == {"reference", "torch"} and all(t > 0 for t in times.values())
    table = scan_table(times).splitlines()
    assert table[0] == "| backend | fwd+bwd (ms) | speed-up vs reference |"
    assert table[2].startswith("| reference |") and table[2].endswith("| 1.0x |")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_reference():
    inputs = make_inputs(2, 8, 4, 300, groups=2)
    y_ref, last_ref, grads_ref = run(inputs, "reference")
    cuda_inputs = {k: v.detach().cuda().requires_grad_() for k, v in inputs.items()}
    y, last, grads = run(cuda_inputs, "torch")
    assert_close(y.cpu(), y_ref)
    assert_close(last.cpu(), last_ref)
    for name in inputs:
        assert_close(grads[name].cpu(), grads_ref[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mamba_ssm_kernel_matches_torch_backend():
    if scan_module.mamba_ssm_scan_fn() is None:
        pytest.skip("mamba_ssm is not installed")
    inputs = {k: v.detach().cuda().requires_grad_() for k, v in make_inputs(2, 8, 4, 300, groups=2).items()}
    y_ref, last_ref, grads_ref = run(inputs, "torch", last_state_grad=False)
    y, last, grads = run(inputs, "mamba_ssm", last_state_grad=False)
    assert_close(y, y_ref, rtol=1e-3)
    assert_close(last, last_ref, rtol=1e-3)
    for name in inputs:
        assert_close(grads[name], grads_ref[name], rtol=1e-3)


# ----------------------------------------------------------------------------------------------------
# mamba-ssm's CUDA extension: a package whose interface imports without it must not be chosen

INTERFACE = '''
try:  # mamba-ssm's main branch: the extension is optional at import time
    import selective_scan_cuda
except ImportError:
    selective_scan_cuda = None


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, cu_seqlens=None):
    return selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cu_seqlens)
'''
EXTENSIONS = {
    "absent": None,
    "ABI-broken": 'raise ImportError("selective_scan_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")',
    "built": "def fwd(*args):\n    return 'kernel'\n",
}


@pytest.fixture
def mamba_ssm_stand_in(tmp_path, monkeypatch):
    """Writes a mamba-ssm package laid out as upstream's into tmp_path; yields a function that installs
    the given extension (see EXTENSIONS) and returns what the guard makes of it."""
    (tmp_path / "mamba_ssm" / "ops").mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("")
    (tmp_path / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (tmp_path / "mamba_ssm" / "ops" / "selective_scan_interface.py").write_text(INTERFACE)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "selective_scan_cuda")

    def install(extension):
        for name in names:
            sys.modules.pop(name, None)
        (tmp_path / "selective_scan_cuda.py").unlink(missing_ok=True)
        if EXTENSIONS[extension] is not None:
            (tmp_path / "selective_scan_cuda.py").write_text(EXTENSIONS[extension])
        importlib.invalidate_caches()
        scan_module.mamba_ssm_scan_fn.cache_clear()
        return scan_module.mamba_ssm_scan_fn()

    yield install
    for name in names:
        sys.modules.pop(name, None)
    scan_module.mamba_ssm_scan_fn.cache_clear()


@pytest.mark.parametrize("extension", ["absent", "ABI-broken"])
def test_mamba_ssm_without_a_working_extension_falls_back_to_triton(mamba_ssm_stand_in, extension):
    assert mamba_ssm_stand_in(extension) is None
    assert active_backend("cuda") == "triton"
    with pytest.raises(RuntimeError, match="selective_scan_cuda cannot be imported.*MAMBA_KEEP_CUDA_BUILD=TRUE"):
        scan_module.check_backend("mamba_ssm", "cuda")


def test_mamba_ssm_with_its_extension_is_chosen_on_cuda(mamba_ssm_stand_in):
    scan_fn = mamba_ssm_stand_in("built")
    assert scan_fn(*[None] * 5) == "kernel"
    assert active_backend("cuda") == "mamba_ssm"
