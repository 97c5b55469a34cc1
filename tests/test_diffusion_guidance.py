"""Classifier-free guidance, guidance intervals and routing guidance on toy models with known outputs."""

import pytest
import torch

from ssm_tread.diffusion import Guidance, RoutingGuidance, cfg_combine, create_diffusion
from ssm_tread.routing import TokenRouter

NUM_CLASSES = 10


class LabelModel:
    """out = x * (1 + y) (plus, with learn_sigma, variance channels x - y); records each call."""

    num_classes = NUM_CLASSES

    def __init__(self, learn_sigma=False, in_channels=2):
        self.learn_sigma, self.in_channels = learn_sigma, in_channels
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append({"batch": x.shape[0], "y": y.clone(), "t": t.clone()})
        scale = 1 + y.view(-1, 1, 1, 1).to(x.dtype)
        out = x * scale
        return torch.cat([out, x - scale], dim=1) if self.learn_sigma else out


class RoutedTokens:
    """Image tokens go through one block that doubles them; with routing only the kept K of N are doubled.

    On an input of ones the output's mean is 1 + K/N, K = N - floor(N * ratio) (N = 16 here).
    """

    num_classes = NUM_CLASSES

    def __init__(self):
        self.router = TokenRouter([(0, 0, 0.5)], depth=1)
        self.ratios = []

    def __call__(self, x, t, y=None):
        batch, channels, height, width = x.shape
        routing = self.router.begin(training=False)
        self.ratios.append(routing.ratio if routing.enabled else None)
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
        tokens = routing.exit(0, 2 * routing.enter(0, tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def test_cfg_combine():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    torch.testing.assert_close(cfg_combine(cond, uncond, 4.0), uncond + 4.0 * (cond - uncond))
    dit = cfg_combine(cond, uncond, 1.5, guided_channels=3)  # the reference DiT's 3 of 4 latent channels
    torch.testing.assert_close(dit[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(dit[:, 3], cond[:, 3])
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)


def test_cfg_evaluates_cond_and_null_label_in_one_call():
    model = LabelModel(learn_sigma=True)
    x, t, y = torch.randn(3, 2, 4, 4), torch.full((3,), 500.0), torch.tensor([0, 4, 9])
    out = Guidance(cfg_scale=4.0, guided_channels=2)(model, x, t, {"y": y}, time=0.5)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 6
    assert model.calls[0]["y"].tolist() == [0, 4, 9, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]
    cond, uncond = x * (1 + y.view(-1, 1, 1, 1)), x * (1 + NUM_CLASSES)
    torch.testing.assert_close(out[:, :2], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(out[:, 2:], x - (1 + y.view(-1, 1, 1, 1)))  # the variance of the cond half


def test_cfg_default_leaves_learned_variance_unguided():
    """As the reference DiT: the variance channels of the sampled (conditional) half are never extrapolated."""
    model = LabelModel(learn_sigma=True, in_channels=2)
    x, t, y = torch.randn(3, 2, 4, 4), torch.full((3,), 500.0), torch.tensor([0, 4, 9])
    out = Guidance(cfg_scale=4.0)(model, x, t, {"y": y}, time=0.5)
    cond, uncond = x * (1 + y.view(-1, 1, 1, 1)), x * (1 + NUM_CLASSES)
    torch.testing.assert_close(out[:, :2], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(out[:, 2:], x - (1 + y.view(-1, 1, 1, 1)))


def test_cfg_scale_one_is_a_single_plain_call():
    model = LabelModel()
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    out = Guidance()(model, x, torch.zeros(2), {"y": y}, time=0.5)
    assert [c["batch"] for c in model.calls] == [2]
    torch.testing.assert_close(out, x * (1 + y.view(-1, 1, 1, 1)))


def test_guidance_interval_flow():
    """Flow time: step k of 10 Euler steps is at t = k / 10; CFG doubles the batch only inside the interval."""
    model = LabelModel()
    guidance = Guidance(cfg_scale=2.0, interval=(0.25, 0.65))
    create_diffusion("flow").sample(model, torch.randn(2, 1, 2, 2), {"y": torch.tensor([1, 2])}, "euler", 10, guidance)
    batches = {round(c["t"][0].item()): c["batch"] for c in model.calls}
    assert batches == {k * 100: 4 if k in (3, 4, 5, 6) else 2 for k in range(10)}


def test_guidance_interval_ddpm():
    """DDPM time: original timestep / 999, 10 respaced steps at round(k * 111)."""
    model = LabelModel()
    guidance = Guidance(cfg_scale=2.0, interval=(0.2, 0.5))
    create_diffusion("ddpm").sample(model, torch.randn(2, 1, 2, 2), {"y": torch.tensor([1, 2])}, "ddim", 10, guidance)
    batches = {round(c["t"][0].item()): c["batch"] for c in model.calls}
    assert batches == {k * 111: 4 if k in (2, 3, 4) else 2 for k in range(10)}


def test_routing_guidance_forces_the_two_ratios():
    model = RoutedTokens()
    x = torch.ones(2, 3, 4, 4)
    out = Guidance(routing=(0.25, 0.5, 2.0))(model, x, torch.zeros(2), {}, time=0.5)
    assert model.ratios == [0.25, 0.5]
    low, high = 1 + 12 / 16, 1 + 8 / 16  # K = 12 and 8 of 16 tokens doubled
    assert out.mean(dim=(1, 2, 3)).tolist() == pytest.approx([high + 2.0 * (low - high)] * 2)
    assert not model.router.begin(training=False).enabled  # forcing ends with the call
    model(x, torch.zeros(2))
    assert model.ratios[-1] is None


def test_routing_guidance_respects_the_interval_and_composes_with_cfg():
    model = RoutedTokens()
    guidance = Guidance(cfg_scale=3.0, interval=(0.0, 0.5), routing=RoutingGuidance(0.0, 0.5, 1.5))
    out = guidance(model, torch.ones(2, 1, 4, 4), torch.zeros(2), {"y": torch.tensor([1, 2])}, time=0.9)
    assert model.ratios == [None]
    torch.testing.assert_close(out, torch.full_like(out, 2.0))  # unrouted: every token doubled
    out = guidance(model, torch.ones(2, 1, 4, 4), torch.zeros(2), {"y": torch.tensor([1, 2])}, time=0.1)
    assert model.ratios[1:] == [0.0, 0.5]
    assert out.mean().item() == pytest.approx(1.5 + 1.5 * (2.0 - 1.5))


def test_routing_guidance_in_a_sampler():
    model = RoutedTokens()
    create_diffusion("flow").sample(model, torch.ones(1, 1, 4, 4), {}, "heun", 3, Guidance(routing=(0.1, 0.6, 1.0)))
    assert model.ratios == [0.1, 0.6] * 6


def test_bad_guidance_settings():
    with pytest.raises(ValueError, match="interval"):
        Guidance(cfg_scale=2.0, interval=(0.6, 0.2))
    with pytest.raises(ValueError, match="low < high"):
        Guidance(routing=(0.5, 0.25, 2.0))
    with pytest.raises(ValueError, match="y"):
        Guidance(cfg_scale=2.0)(LabelModel(), torch.randn(1, 1, 2, 2), torch.zeros(1), {}, time=0.5)
