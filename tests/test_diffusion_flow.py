"""Flow matching against the SiT formulas and ODE/SDE samplers on data whose exact velocity is known."""

import pytest
import torch

from ssm_tread.diffusion import FlowMatching, create_diffusion


class GaussianDataVelocity:
    """E[x - noise | x_t] for data ~ N(mean, std^2) and x_t = t x + (1 - t) noise; the model sees 1000 t."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std
        self.times = []

    def __call__(self, x, t, **kwargs):
        self.times.append(t[0].item())
        a = (t / 1000).view(-1, 1, 1, 1).to(x.dtype)
        b = 1 - a
        return self.mean + (a * self.std**2 - b) * (x - a * self.mean) / (a**2 * self.std**2 + b**2)


def test_interpolant_and_velocity_target_are_sits():
    f = create_diffusion("flow")
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t, target = f.interpolate(x, noise, t)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[1], 0.25 * x[1] + 0.75 * noise[1])
    torch.testing.assert_close(x_t[2], x[2])
    torch.testing.assert_close(target, x - noise)


def test_training_loss_is_the_velocity_mse_and_the_model_sees_1000_t():
    f = create_diffusion("flow")
    gen = torch.Generator().manual_seed(0)
    x, noise, pred = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    seen = {}

    def model(x_t, t, y):
        seen.update(x_t=x_t, t=t, y=y)
        return pred

    t = torch.tensor([0.1, 0.9])
    y = torch.tensor([3, 5])
    losses = f.training_losses(model, x, {"y": y}, noise=noise, t=t)
    torch.testing.assert_close(seen["t"], torch.tensor([100.0, 900.0]))
    torch.testing.assert_close(seen["x_t"], t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise)
    assert torch.equal(seen["y"], y)
    expected = ((x - noise - pred) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"], expected)
    torch.testing.assert_close(losses["mse"], expected)


def test_learned_sigma_channels_are_ignored():
    f = create_diffusion("flow")
    x, noise, pred = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(2, 6, 2, 2)
    losses = f.training_losses(lambda x_t, t: pred, x, {}, noise=noise, t=torch.tensor([0.3, 0.6]))
    torch.testing.assert_close(losses["loss"], ((x - noise - pred[:, :3]) ** 2).mean(dim=(1, 2, 3)))


def test_time_distributions():
    x = torch.zeros(100000, 1, 1, 1)
    gen = torch.Generator().manual_seed(1)
    t = create_diffusion("flow").sample_time(x, gen)
    assert 0 <= t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01) and t.var().item() == pytest.approx(1 / 12, rel=0.03)
    t = create_diffusion("flow", time_dist="logit_normal", logit_mean=0.5, logit_std=0.8).sample_time(x, gen)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, rel=0.02)
    t_a = create_diffusion("flow").sample_time(x, torch.Generator().manual_seed(2))
    t_b = create_diffusion("flow").sample_time(x, torch.Generator().manual_seed(2))
    assert torch.equal(t_a, t_b)


def sample_stats(sampler, steps, shape=(64, 1, 8, 8), seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    model = GaussianDataVelocity(mean=0.5, std=0.3)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = create_diffusion("flow", **options).sample(model, noise, {}, sampler=sampler, steps=steps, generator=gen)
    return x.mean().item(), x.std().item(), model.times


@pytest.mark.parametrize(
    "sampler, steps, shape",
    [("euler", 250, (64, 1, 8, 8)), ("heun", 50, (64, 1, 8, 8)), ("euler_maruyama", 250, (256, 1, 8, 8))],
)
def test_samplers_recover_gaussian_data(sampler, steps, shape):
    mean, std, times = sample_stats(sampler, steps, shape)
    assert mean == pytest.approx(0.5, abs=0.02)
    assert std == pytest.approx(0.3, rel=0.04)
    grid = [1000 * k / steps for k in range(steps + 1)]
    if sampler == "heun":  # each step evaluates at both of its ends
        assert times == [g for k in range(steps) for g in (grid[k], grid[k + 1])]
    else:
        assert times == pytest.approx(grid[:-1])


def test_heun_beats_euler_at_few_steps():
    _, euler, _ = sample_stats("euler", 10)
    _, heun, _ = sample_stats("heun", 10)
    _, exact, _ = sample_stats("heun", 200)
    assert abs(heun - exact) < abs(euler - exact) / 5


def test_sde_sampling_is_reproducible_with_a_generator():
    runs = [sample_stats("euler_maruyama", 20, (2, 1, 4, 4), seed=0, sde_norm=1.0) for _ in range(2)]
    assert runs[0][:2] == runs[1][:2]
    f = create_diffusion("flow")
    model = GaussianDataVelocity(0.0, 1.0)
    noise = torch.randn(2, 1, 4, 4)
    a, b = (
        f.sample(model, noise, {}, "euler_maruyama", 20, generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    )
    assert not torch.equal(a, b)


def test_euler_reaches_point_data():
    """Data = a point m: v = (m - x) / (1 - t) points straight at m, so the last Euler step lands on it."""
    model = lambda x, t: (0.7 - x) / (1 - t / 1000).view(-1, 1, 1, 1)  # noqa: E731
    x = create_diffusion("flow").sample(model, torch.randn(3, 1, 2, 2, dtype=torch.float64), {}, "euler", 8)
    torch.testing.assert_close(x, torch.full_like(x, 0.7))


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match="'uniform', 'logit_normal'"):
        create_diffusion("flow", time_dist="beta")
    f = create_diffusion("flow")
    with pytest.raises(ValueError, match="'euler', 'heun', 'euler_maruyama'"):
        f.sample(GaussianDataVelocity(0.0, 1.0), torch.randn(1, 1, 2, 2), {}, sampler="ddim")
    assert f.default_sampler in f.samplers and isinstance(f, FlowMatching)
