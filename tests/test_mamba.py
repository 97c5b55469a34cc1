"""The causal depthwise conv against a naive loop, and the Mamba mixer against a token-by-token
recurrent implementation, its causality, parameters and initialisation."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from ssm_tread.models.mamba import Mamba
from ssm_tread.ops import causal_conv1d


def naive_causal_conv(x, weight, bias, activation):
    """out[b, e, t] = sum_k weight[e, k] * x[b, e, t - K + 1 + k] (+ bias), zero before the start."""
    batch, channels, length = x.shape
    width = weight.shape[1]
    out = torch.zeros_like(x)
    for b in range(batch):
        for e in range(channels):
            for t in range(length):
                acc = 0.0 if bias is None else bias[e].item()
                for k in range(width):
                    s = t - width + 1 + k
                    if s >= 0:
                        acc += weight[e, k].item() * x[b, e, s].item()
                out[b, e, t] = acc / (1 + math.exp(-acc)) if activation else acc
    return out


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv_matches_naive_loop(width, use_bias, activation):
    g = torch.Generator().manual_seed(width)
    x, weight, bias = torch.randn(2, 3, 7, generator=g), torch.randn(3, width, generator=g), torch.randn(3, generator=g)
    bias = bias if use_bias else None
    expected = naive_causal_conv(x, weight, bias, activation)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation), expected, rtol=1e-5, atol=1e-6)


def test_causal_conv_rejects_bad_arguments():
    x, weight = torch.randn(2, 3, 7), torch.randn(3, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(ValueError, match=r"x \[B, E, L\] and weight \[E, K\]"):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"bias \[E\]"):
        causal_conv1d(x, weight, torch.randn(4))


def recurrent_mamba(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The mixer one token at a time, carrying a conv window [B, E, K] and an SSM state [B, E, N]."""
    batch, length, _ = x.shape
    E, N, R = m.d_inner, m.d_state, m.dt_rank
    A = -torch.exp(m.A_log)
    window = x.new_zeros(batch, E, m.d_conv)
    h = x.new_zeros(batch, E, N)
    outs = []
    for t in range(length):
        xz = x[:, t] @ m.in_proj.weight.t()
        xt, z = xz[:, :E], xz[:, E:]
        window = torch.cat([window[:, :, 1:], xt[:, :, None]], dim=2)
        xt = F.silu((window * m.conv1d.weight[:, 0]).sum(-1) + m.conv1d.bias)
        dbc = xt @ m.x_proj.weight.t()
        dt = F.softplus(dbc[:, :R] @ m.dt_proj.weight.t() + m.dt_proj.bias)  # [B, E]
        Bt, Ct = dbc[:, R : R + N], dbc[:, R + N :]  # [B, N]
        h = torch.exp(dt[:, :, None] * A) * h + dt[:, :, None] * Bt[:, None, :] * xt[:, :, None]
        y = ((h * Ct[:, None, :]).sum(-1) + m.D * xt) * F.silu(z)
        outs.append(y @ m.out_proj.weight.t())
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_mixer_matches_recurrent_form(backend, monkeypatch):
    monkeypatch.setenv("SSM_TREAD_SCAN_BACKEND", backend)
    torch.manual_seed(0)
    m = Mamba(d_model=24, d_state=8, d_conv=3)
    x = torch.randn(2, 45, 24)
    with torch.no_grad():
        torch.testing.assert_close(m(x), recurrent_mamba(m, x), rtol=1e-4, atol=1e-5)


def test_parameters_follow_mamba_ssm():
    m = Mamba(d_model=40, d_state=16, d_conv=4, expand=2)
    E, R = 80, math.ceil(40 / 16)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "A_log": (E, 16),
        "D": (E,),
        "in_proj.weight": (2 * E, 40),
        "conv1d.weight": (E, 1, 4),
        "conv1d.bias": (E,),
        "x_proj.weight": (R + 32, E),
        "dt_proj.weight": (E, R),
        "dt_proj.bias": (E,),
        "out_proj.weight": (40, E),
    }
    assert Mamba(16, dt_rank=5, bias=True, conv_bias=False).dt_proj.weight.shape == (32, 5)
    assert "in_proj.bias" in dict(Mamba(16, bias=True).named_parameters())


def test_initialisation():
    m = Mamba(d_model=64, d_state=8, dt_min=0.002, dt_max=0.05)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 9.0)).expand(128, 8))
    assert torch.equal(m.D, torch.ones(128))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound


def test_mixer_is_causal_along_the_token_order():
    torch.manual_seed(0)
    m = Mamba(d_model=16, d_state=4)
    x = torch.randn(2, 20, 16)
    t = 11
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 16)
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=0)
    assert (y2[:, t] - y[:, t]).abs().max() > 1e-6
    assert (y2[:, -1] - y[:, -1]).abs().max() > 1e-6


def test_gradients_reach_every_parameter():
    m = Mamba(d_model=16, d_state=4, bias=True)
    m(torch.randn(2, 9, 16)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shape", [(2, 5, 8), (5, 16), (1, 2, 3, 16)])
def test_mixer_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"expected x \[B, L, 16\]"):
        Mamba(16)(torch.randn(shape))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixer_on_cuda_matches_cpu():
    torch.manual_seed(0)
    m = Mamba(d_model=32)
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        expected = m(x)
        actual = m.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# The causal-conv1d CUDA package's call site, checked with a stand-in of its public function


def upstream_causal_conv1d_fn(calls):
    """A stand-in with causal-conv1d's signature and argument handling (causal_conv1d_interface.py, 1.6/1.7):
    seq_idx must be a tensor or None, the kernel takes widths 2-4."""

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        if activation not in [None, "silu", "swish"]:
            raise NotImplementedError("activation must be None, silu, or swish")
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None
        if not 2 <= weight.shape[1] <= 4:
            raise RuntimeError("causal_conv1d only supports width between 2 and 4")
        calls.append(activation)
        return naive_causal_conv(x, weight, bias, activation in ("silu", "swish"))

    return causal_conv1d_fn


@pytest.fixture
def conv_stand_in(monkeypatch):
    """causal_conv1d (with its extension) importable, its kernel used for CPU tensors; yields the calls."""
    import types

    from ssm_tread.ops import causal_conv as conv_module

    calls = []
    package = types.ModuleType("causal_conv1d")
    package.causal_conv1d_fn = upstream_causal_conv1d_fn(calls)
    monkeypatch.setitem(sys.modules, "causal_conv1d", package)
    monkeypatch.setitem(sys.modules, "causal_conv1d_cuda", types.ModuleType("causal_conv1d_cuda"))
    monkeypatch.setattr(conv_module, "KERNEL_DEVICE", "cpu")
    conv_module.causal_conv1d_kernel.cache_clear()
    yield calls
    conv_module.causal_conv1d_kernel.cache_clear()


def test_the_mixer_calls_the_causal_conv1d_kernel_with_its_signature(conv_stand_in):
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4, d_conv=4, expand=2)
    x = torch.randn(2, 5, 8)
    with_kernel = mixer(x)
    assert conv_stand_in == ["silu"]  # the kernel ran, and was asked for SiLU
    from ssm_tread.ops import causal_conv as conv_module

    conv_module.causal_conv1d_kernel.cache_clear()
    sys.modules["causal_conv1d_cuda"] = None  # the extension missing: the F.conv1d path
    torch.testing.assert_close(with_kernel, mixer(x), rtol=1e-5, atol=1e-6)
    assert conv_stand_in == ["silu"]


def test_shapes_the_kernel_cannot_take_fall_back_to_conv1d(conv_stand_in):
    x, weight, bias = torch.randn(1, 3, 9), torch.randn(3, 5), torch.randn(3)
    torch.testing.assert_close(causal_conv1d(x, weight, bias), naive_causal_conv(x, weight, bias, "silu"),
                               rtol=1e-5, atol=1e-6)
    assert conv_stand_in == []  # width 5: the kernel is compiled for 2-4
    causal_conv1d(x, torch.randn(3, 2), None, None)
    assert conv_stand_in == [None]
