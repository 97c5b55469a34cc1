"""DDPM against closed forms: the schedule, q(x_t|x0), the posterior by Gaussian conditioning,
torch.distributions for KL and likelihoods, and samplers on data whose exact denoiser is known."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ssm_tread.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)

T = 1000


def reference_alphas_cumprod():
    """DiT's schedule written out: betas 1e-4 + k * (0.02 - 1e-4) / 999, running product of 1 - beta."""
    abar, out = 1.0, []
    for k in range(T):
        abar *= 1 - (1e-4 + k * (0.02 - 1e-4) / (T - 1))
        out.append(abar)
    return torch.tensor(out, dtype=torch.float64)


ABAR = reference_alphas_cumprod()


class GaussianDataDenoiser:
    """The exact eps predictor E[eps | x_t] for data ~ N(mean, std^2), indexed by the model's timestep."""

    def __init__(self, mean, std, learned_v=None):
        self.mean, self.std, self.learned_v = mean, std, learned_v
        self.timesteps = []

    def __call__(self, x, t, **kwargs):
        assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= T - 1
        self.timesteps.append(t[0].item())
        abar = ABAR[t.long()].view(-1, 1, 1, 1).to(x.dtype)
        var = abar * self.std**2 + 1 - abar
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mean) / var
        if self.learned_v is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.learned_v)], dim=1)


def test_linear_schedule_is_dits():
    d = create_diffusion("ddpm")
    assert d.num_timesteps == T
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(d.alphas_cumprod, ABAR)


def test_cosine_schedule_follows_its_alpha_bar():
    d = create_diffusion("ddpm", schedule="cosine")
    f = lambda k: math.cos((k / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for k in [0, 100, 500, 900]:  # before the 0.999 clip on beta bites
        assert d.alphas_cumprod[k].item() == pytest.approx(f(k + 1) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)


def test_q_sample_moments_match_closed_form():
    d = create_diffusion("ddpm")
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    gen = torch.Generator().manual_seed(0)
    for k in [0, 10, 250, 999]:
        t = torch.full((x0.shape[0],), k)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        assert x_t.mean().item() == pytest.approx(0.7 * ABAR[k].sqrt().item(), abs=0.02)
        assert x_t.var().item() == pytest.approx(1 - ABAR[k].item(), rel=0.05, abs=1e-5)
    noise = torch.randn(3, 2, 4, 4, generator=gen)
    x0 = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 400, 999])
    expected = ABAR[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ABAR[t]).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected.float())


def test_posterior_is_gaussian_conditioning():
    """x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)."""
    d = create_diffusion("ddpm")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    x_t = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 300, 999])
    prev = ABAR[t - 1].view(-1, 1, 1, 1)
    alpha = (ABAR[t] / ABAR[t - 1]).view(-1, 1, 1, 1)
    precision = 1 / (1 - prev) + alpha / (1 - alpha)
    mean = (prev.sqrt() * x0 / (1 - prev) + alpha.sqrt() * x_t / (1 - alpha)) / precision
    got_mean, got_var, got_log_var = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean, mean)
    torch.testing.assert_close(got_var.expand_as(mean), (1 / precision).expand_as(mean))
    torch.testing.assert_close(got_log_var.expand_as(mean), (1 / precision).log().expand_as(mean))
    # At t = 0 the posterior is a point mass; the log variance is clipped to the value at t = 1.
    _, var0, log_var0 = d.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long))
    assert var0.abs().max().item() == 0
    beta1 = 1 - ABAR[1] / ABAR[0]
    assert log_var0[0].item() == pytest.approx(math.log(beta1 * (1 - ABAR[0]) / (1 - ABAR[1])))


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=gen, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_log_likelihood_matches_bin_probabilities():
    gen = torch.Generator().manual_seed(3)
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean, log_scale = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.2, dtype=torch.float64)
    dist = Normal(mean, log_scale.exp())
    expected = dist.cdf(bins + 1 / 255) - dist.cdf(bins - 1 / 255)
    expected[0] = dist.cdf(bins[0] + 1 / 255)
    expected[-1] = 1 - dist.cdf(bins[-1] - 1 / 255)
    got = discretized_gaussian_log_likelihood(bins, mean, log_scale)
    torch.testing.assert_close(got.exp(), expected, atol=1e-12, rtol=1e-9)
    assert got.exp().sum().item() == pytest.approx(1.0)
    # Random inputs: every pixel of an image at its own mean and scale.
    x = bins[torch.randint(0, 256, (50,), generator=gen)]
    mean, log_scale = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen).double() - 2
    dist = Normal(mean, log_scale.exp())
    upper = torch.where(x > 0.999, torch.ones_like(x), dist.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), dist.cdf(x - 1 / 255))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    likely = upper - lower > 1e-9  # below that the cdf difference loses its digits
    torch.testing.assert_close(got[likely], (upper - lower)[likely].log())
    assert (got[~likely] < math.log(1e-9)).all()


def test_space_timesteps():
    kept = space_timesteps(T, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert max(b - a for a, b in zip(kept, kept[1:])) <= 5
    assert space_timesteps(T, 250) == kept
    assert space_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(T, "1000") == list(range(1000))
    sections = space_timesteps(T, "10,2")
    assert sections == [round(k * 499 / 9) for k in range(10)] + [500, 999]
    with pytest.raises(ValueError):
        space_timesteps(T, "ddim600")
    with pytest.raises(ValueError):
        space_timesteps(T, "2000")


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,20,5"])
def test_respaced_betas_keep_alphas_cumprod(spec):
    d = create_diffusion("ddpm").respace(spec)
    kept = space_timesteps(T, spec)
    assert d.num_timesteps == len(kept) and d.timestep_map.tolist() == kept
    running = torch.cumprod(1 - d.betas, dim=0)
    torch.testing.assert_close(running, ABAR[kept])
    t = torch.arange(len(kept))
    assert d.model_time(t).tolist() == [float(k) for k in kept]


def test_learned_variance_interpolates_between_beta_and_posterior():
    d = create_diffusion("ddpm")
    x_t = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 500, 999])
    beta = 1 - ABAR[t] / ABAR[t - 1]
    posterior = beta * (1 - ABAR[t - 1]) / (1 - ABAR[t])
    for v, expected in [(1.0, beta.log()), (-1.0, posterior.log()), (0.0, 0.5 * (beta.log() + posterior.log()))]:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        log_var = d.p_mean_variance(out, x_t, t)["log_var"]
        torch.testing.assert_close(log_var[:, 0, 0, 0], expected)
    fixed = d.p_mean_variance(torch.zeros_like(x_t), x_t, t)["log_var"]  # "large": beta_t
    torch.testing.assert_close(fixed.flatten(1)[:, 0], beta.log())
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(torch.zeros(3, 3, 2, 2, dtype=torch.float64), x_t, t)


def test_hybrid_loss_terms():
    """mse on eps; vb in bits: KL(true posterior || model) at t > 0, the decoder's -log likelihood at t = 0."""
    d = create_diffusion("ddpm")
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (2, 1, 2, 2), generator=gen).double() * 2 / 255 - 1  # 8-bit pixel values
    x0[0, 0, 0] = torch.tensor([-1.0, 1.0])  # both end bins
    noise, eps_out = (torch.randn(2, 1, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    v_out = torch.rand(2, 1, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    eps_param, v_param = torch.nn.Parameter(eps_out.clone()), torch.nn.Parameter(v_out.clone())
    model = lambda x, t: torch.cat([eps_param, v_param], dim=1)  # noqa: E731
    losses = d.training_losses(model, x0, {}, noise=noise, t=torch.tensor([0, 600]))
    torch.testing.assert_close(losses["mse"], ((noise - eps_out) ** 2).mean(dim=(1, 2, 3)))

    def posterior_and_model(b, k, prev, min_var):
        """Sample b at timestep k (prev = abar_{k-1}): the posterior mean as a function of x0, and p."""
        a = ABAR[k]
        beta = 1 - a / prev
        x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b]
        mean = lambda z0: (prev.sqrt() * beta * z0 + (1 - beta).sqrt() * (1 - prev) * x_t) / (1 - a)  # noqa: E731
        frac = (v_out[b] + 1) / 2
        std = (0.5 * (frac * beta.log() + (1 - frac) * math.log(min_var))).exp()
        return mean, Normal(mean((x_t - (1 - a).sqrt() * eps_out[b]) / a.sqrt()), std)

    beta = 1 - ABAR[600] / ABAR[599]
    post_var = (beta * (1 - ABAR[599]) / (1 - ABAR[600])).item()
    mean, p = posterior_and_model(1, 600, ABAR[599], post_var)
    kl = kl_divergence(Normal(mean(x0[1]), math.sqrt(post_var)), p).mean()
    assert losses["vb"][1].item() == pytest.approx(kl.item() / math.log(2), rel=1e-6)

    post_var_t1 = ((1 - ABAR[1] / ABAR[0]) * (1 - ABAR[0]) / (1 - ABAR[1])).item()  # t = 0's is clipped to t = 1's
    _, p = posterior_and_model(0, 0, torch.tensor(1.0, dtype=torch.float64), post_var_t1)
    upper = torch.where(x0[0] > 0.999, 1.0, p.cdf(x0[0] + 1 / 255))
    lower = torch.where(x0[0] < -0.999, 0.0, p.cdf(x0[0] - 1 / 255))
    assert losses["vb"][0].item() == pytest.approx(-(upper - lower).log().mean().item() / math.log(2), rel=1e-6)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    losses["vb"].sum().backward()  # the VLB term trains the variance only
    assert eps_param.grad.abs().max().item() == 0 and v_param.grad.abs().max().item() > 0


def sample_stats(diffusion, model, sampler, steps, shape=(64, 1, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = diffusion.sample(model, noise, {}, sampler=sampler, steps=steps, generator=gen)
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize(
    "sampler, steps, options, learned_v",
    [
        ("ddim", 250, {}, None),
        ("ddim", 1000, {"ddim_eta": 1.0}, None),
        ("ddpm", 250, {"fixed_variance": "large"}, None),
        ("ddpm", 1000, {"fixed_variance": "small"}, None),
        ("ddpm", 250, {}, 0.0),
    ],
)
def test_samplers_recover_gaussian_data(sampler, steps, options, learned_v):
    d = create_diffusion("ddpm", **options)
    model = GaussianDataDenoiser(mean=0.5, std=0.3, learned_v=learned_v)
    mean, std = sample_stats(d, model, sampler, steps)
    assert mean == pytest.approx(0.5, abs=0.02)
    assert std == pytest.approx(0.3, rel=0.04)
    assert model.timesteps == sorted(space_timesteps(T, steps), reverse=True)


def ddim_final_std(kept, std, eta):
    """DDIM on N(m, std^2) data with the exact denoiser is linear in x_t: propagate the variance."""
    var = 1.0
    for i in range(len(kept) - 1, -1, -1):
        a = ABAR[kept[i]].item()
        a_prev = ABAR[kept[i - 1]].item() if i > 0 else 1.0
        sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        gain = (math.sqrt(a_prev * a) * std**2 + math.sqrt((1 - a_prev - sigma2) * (1 - a))) / (a * std**2 + 1 - a)
        var = gain**2 * var + sigma2
    return math.sqrt(var)


@pytest.mark.parametrize("steps, eta", [("ddim50", 0.0), (20, 0.0), ("ddim50", 1.0), (20, 0.5)])
def test_few_step_ddim_matches_its_exact_variance(steps, eta):
    """Few DDIM steps under-disperse; the amount is known exactly for Gaussian data."""
    d = create_diffusion("ddpm", ddim_eta=eta)
    mean, std = sample_stats(d, GaussianDataDenoiser(mean=-0.2, std=0.3), "ddim", steps)
    assert mean == pytest.approx(-0.2, abs=0.02)
    assert std == pytest.approx(ddim_final_std(space_timesteps(T, steps), 0.3, eta), rel=0.03)


def test_ddim_with_eta_one_is_ddpm_with_the_posterior_variance():
    """sigma^2 at eta = 1 is the posterior variance, so both samplers draw the same chain."""
    model = GaussianDataDenoiser(mean=0.1, std=0.4)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    ddim = create_diffusion("ddpm", ddim_eta=1.0)
    ddpm = create_diffusion("ddpm", fixed_variance="small")
    x_ddim = ddim.sample(model, noise, {}, "ddim", 25, generator=torch.Generator().manual_seed(3))
    x_ddpm = ddpm.sample(model, noise, {}, "ddpm", 25, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_ddim, x_ddpm)


def test_ddim_on_a_point_lands_on_it():
    d = create_diffusion("ddpm")
    noise = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x = d.sample(GaussianDataDenoiser(mean=0.25, std=0.0), noise, {}, sampler="ddim", steps=10)
    torch.testing.assert_close(x, torch.full_like(x, 0.25))


def test_sampling_is_reproducible_with_a_generator():
    d = create_diffusion("ddpm")
    model = GaussianDataDenoiser(mean=0.0, std=1.0)
    noise = torch.randn(2, 1, 4, 4)
    runs = [d.sample(model, noise, {}, steps=20, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_training_draws_are_reproducible_and_cover_all_timesteps():
    d = create_diffusion("ddpm")
    seen = []
    model = lambda x, t: (seen.append(t), torch.zeros_like(x))[1]  # noqa: E731
    x0 = torch.zeros(4000, 1, 1, 1)
    a = d.training_losses(model, x0, {}, generator=torch.Generator().manual_seed(5))["loss"]
    b = d.training_losses(model, x0, {}, generator=torch.Generator().manual_seed(5))["loss"]
    assert torch.equal(a, b) and torch.equal(seen[0], seen[1])
    assert seen[0].min() >= 0 and seen[0].max() <= 999 and seen[0].unique().numel() > 950
    assert a.mean().item() == pytest.approx(1.0, abs=0.1)  # a zero eps prediction: E[noise^2] = 1


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match="'ddpm', 'flow'"):
        create_diffusion("edm")
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        create_diffusion("ddpm", schedule="sigmoid")
    with pytest.raises(ValueError, match="'large', 'small'"):
        create_diffusion("ddpm", fixed_variance="learned")
    d = create_diffusion("ddpm")
    with pytest.raises(ValueError, match="'ddpm', 'ddim'"):
        d.sample(GaussianDataDenoiser(0.0, 1.0), torch.randn(1, 1, 2, 2), {}, sampler="euler")
    with pytest.raises(ValueError, match="'full', 'routed'"):
        d.training_losses(GaussianDataDenoiser(0.0, 1.0), torch.randn(1, 1, 2, 2), {}, loss_type="masked")
    assert d.default_sampler in d.samplers and isinstance(d, GaussianDiffusion)


def test_training_times_are_uniform_steps_and_what_the_loss_draws():
    diffusion = create_diffusion("ddpm", num_timesteps=10, schedule="cosine")
    x = torch.zeros(50000, 1, 1, 1)
    t = diffusion.sample_time(x, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    assert torch.bincount(t, minlength=10).float().div(len(t)).sub(0.1).abs().max() < 0.01
    seen = []

    def model(x_t, model_t):
        seen.append(model_t)
        return torch.zeros_like(x_t)

    small = torch.zeros(4, 1, 1, 1)
    diffusion.training_losses(model, small, {}, generator=torch.Generator().manual_seed(3))
    expected = diffusion.sample_time(small, torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], expected.float())  # the identity timestep map: the model sees the drawn steps
