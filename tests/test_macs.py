"""count_macs: the published DiT figures, routed costs, and the hooks it counts through."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ssm_tread.models import count_macs, create_model
from ssm_tread.models.dit import DiT
from ssm_tread.models.macs import selective_scan_macs
from ssm_tread.routing import TokenRouter

# the DiT paper's GMACs (its "Gflops") for 32x32x4 latents
PUBLISHED_GMACS = {
    "DiT-S/2": 6.06, "DiT-S/4": 1.41, "DiT-S/8": 0.36,
    "DiT-B/2": 23.01, "DiT-B/4": 5.57, "DiT-B/8": 1.42,
    "DiT-L/2": 80.70, "DiT-L/4": 19.70, "DiT-L/8": 5.01,
    "DiT-XL/2": 118.64, "DiT-XL/4": 29.0, "DiT-XL/8": 7.39,
}  # fmt: skip


def meta_model(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **overrides)


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_dit_macs_match_published(name):
    gmacs = count_macs(meta_model(name), routed=False) / 1e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)


@pytest.mark.parametrize("name, start, end, share", [("DiT-XL/2", 2, 24, 0.58), ("DiT-B/2", 2, 8, 0.70)])
def test_routed_share_of_forward(name, start, end, share):
    model = meta_model(name, routes=[{"start": start, "end": end, "ratio": 0.5}])
    full, routed = count_macs(model, routed=False), count_macs(model, routed=True)
    assert routed / full == pytest.approx(share, abs=0.01)


def analytic_dit_macs(depth: int, dim: int, tokens: int, patch: int, channels: int, kept: dict) -> int:
    """Linears, patch conv and attention matmuls; ``kept[i]``: the tokens block i sees."""
    macs = tokens * channels * patch * patch * dim  # patch embedding
    macs += 256 * dim + dim * dim  # timestep MLP
    for i in range(depth):
        n = kept.get(i, tokens)
        macs += n * 12 * dim * dim + 2 * n * n * dim + 6 * dim * dim
    macs += 2 * dim * dim + tokens * dim * patch * patch * 2 * channels  # final layer
    return macs


def test_exact_count_of_a_small_dit():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10,
                routes=[{"start": 1, "end": 2, "ratio": 0.25}])  # fmt: skip
    assert count_macs(model, routed=False) == analytic_dit_macs(4, 64, 16, 2, 4, {})
    assert count_macs(model, routed=True) == analytic_dit_macs(4, 64, 16, 2, 4, {1: 12, 2: 12})


def test_meta_and_cpu_counts_agree_and_mode_is_restored():
    kwargs = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    cpu = DiT(**kwargs).train()
    with torch.device("meta"):
        meta = DiT(**kwargs)
    assert count_macs(cpu, routed=False) == count_macs(meta, routed=False)
    assert cpu.training
    assert all(not module._forward_hooks for module in cpu.modules())


def test_unrouted_model_counts_the_same_routed():
    model = meta_model("DiT-S/4")
    assert count_macs(model, routed=True) == count_macs(model, routed=False)


class Scan(nn.Module):
    """A stand-in mixer: a depthwise conv and a scan reported through ``extra_macs``."""

    def __init__(self, channels: int, d_state: int):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, kernel_size=4, groups=channels, padding=3)
        self.d_state = d_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, E]
        return self.conv1d(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)

    def extra_macs(self, inputs: tuple, output: torch.Tensor) -> int:
        batch, length, channels = inputs[0].shape
        return selective_scan_macs(batch, length, channels, self.d_state)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_channels, self.input_size = 3, (4, 6)
        self.router = TokenRouter(None, depth=1)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.scan = Scan(8, d_state=16)

    def forward(self, x, t, y):
        return self.scan(self.conv(x).flatten(2).transpose(1, 2))


def test_conv_and_extra_macs_hooks():
    pixels = 4 * 6
    conv2d = pixels * 8 * 3 * 9
    conv1d = (pixels + 3) * 8 * 4  # padded output length L + 3
    scan = 2 * pixels * 8 * 16
    assert count_macs(ToyModel(), routed=False) == conv2d + conv1d + scan
