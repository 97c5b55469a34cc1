"""DPM-Solver++ (the official DiM sampler) against closed forms: on Gaussian data the exact denoiser is
known and the probability-flow ODE has an exact solution; each update has the local error of its order,
one step is DDIM, and the model is evaluated once per step at the times of a uniform grid."""

import math

import numpy as np
import pytest
import torch
from test_train import TINY

from ssm_tread.diffusion import create_diffusion
from ssm_tread.diffusion.dpm_solver import DiscreteSchedule, dpm_solver_update, order_plan
from ssm_tread.train.config import load_config
from ssm_tread.train.validate import config_problems

T = 1000
# DiM's betas written out: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)
BETAS = np.array([(0.00085**0.5 + k * (0.012**0.5 - 0.00085**0.5) / (T - 1)) ** 2 for k in range(T)])
LOG_ALPHA = 0.5 * np.cumsum(np.log1p(-BETAS))  # at t = n / T, n = 1..T (DPM-Solver's continuous time)
MEAN, STD = 0.3, 0.5  # the data: every element ~ N(MEAN, STD^2)


def alpha_sigma(t):
    log_alpha = np.interp(t, np.arange(1, T + 1) / T, LOG_ALPHA)
    return math.exp(log_alpha), math.sqrt(1 - math.exp(2 * log_alpha))


class GaussianDenoiser:
    """E[eps | x_t] for data ~ N(MEAN, STD^2) at continuous time t = (timestep - offset + 1) / T."""

    def __init__(self, offset, learned_variance=False):
        self.offset, self.learned_variance, self.timesteps = offset, learned_variance, []

    def __call__(self, x, timestep, **kwargs):
        assert timestep.shape == (x.shape[0],) and (timestep == timestep[0]).all()
        self.timesteps.append(timestep[0].item())
        alpha, sigma = alpha_sigma((timestep[0].item() - self.offset + 1) / T)
        eps = sigma * (x - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if self.learned_variance else eps


def exact_ode_solution(x, start, end=1.0 / T):
    """The probability-flow ODE maps x at t = start to t = end linearly for Gaussian data: the deviation
    from alpha_t MEAN scales with the marginal standard deviation sqrt(alpha_t^2 STD^2 + sigma_t^2)."""
    (a1, s1), (a0, s0) = alpha_sigma(start), alpha_sigma(end)
    return a0 * MEAN + (x - a1 * MEAN) * math.sqrt(a0**2 * STD**2 + s0**2) / math.sqrt(a1**2 * STD**2 + s1**2)


def solve(steps, offset=1, learned_variance=False, noise=None):
    diffusion = create_diffusion("ddpm", schedule="scaled_linear", timestep_offset=offset)
    noise = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) if noise is None else noise
    model = GaussianDenoiser(offset, learned_variance)
    return diffusion.sample(model, noise, {}, sampler="dpm_solver", steps=steps), model, noise


def test_fifty_steps_solve_the_ode():
    x, model, noise = solve(50)
    # the official time-uniform grid ends with a long step in log-SNR (lambda 1.6 -> 3.5), which holds
    # most of the error: 0.024 at 50 steps, 0.012 at 100
    torch.testing.assert_close(x, exact_ode_solution(noise, 1.0), rtol=0, atol=0.03)
    assert len(model.timesteps) == 50


@pytest.mark.parametrize("order", [1, 2, 3])
def test_one_update_has_the_local_error_of_its_order(order):
    """One update over [s, s - H] errs by O(H^(order + 1)): halving H divides the error by ~2^(order + 1)."""
    diffusion = create_diffusion("ddpm", schedule="scaled_linear")
    schedule, model = DiscreteSchedule(diffusion.alphas_cumprod), GaussianDenoiser(offset=1)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def data_prediction(x, t):
        alpha, sigma = alpha_sigma(t)
        return (x - sigma * model(x, torch.full((x.shape[0],), T * t, dtype=torch.float64))) / alpha

    errors = []
    for h in (0.2, 0.1, 0.05):
        times = list(np.linspace(0.5, 0.5 - h, order + 1))
        exact = exact_ode_solution(x, 0.5, 0.5 - h)
        errors.append((dpm_solver_update(data_prediction, x, schedule, times) - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine > 0.8 * 2 ** (order + 1)


def test_one_step_is_ddim():
    """From t = 1 to t = 1/T in one step: x = alpha_e x0_hat + sigma_e eps_hat, both read off the model at t = 1."""
    x, model, noise = solve(1)
    (a1, s1), (a0, s0) = alpha_sigma(1.0), alpha_sigma(1.0 / T)
    eps = s1 * (noise - a1 * MEAN) / (a1**2 * STD**2 + s1**2)
    torch.testing.assert_close(x, a0 * (noise - s1 * eps) / a1 + s0 * eps)
    assert model.timesteps == [T]


def test_the_order_plan_of_dpm_solver_fast():
    """The DPM-Solver paper (section 3.4): K = steps // 3 + 1 updates; steps % 3 == 0: K - 2 of order 3, then
    one of order 2 and one of order 1; % 3 == 1: K - 1 of order 3 and one of order 1; % 3 == 2: K - 1 of
    order 3 and one of order 2."""
    assert order_plan(48) == [3] * 15 + [2, 1]
    assert order_plan(49) == [3] * 16 + [1]
    assert order_plan(50) == [3] * 16 + [2]
    assert [order_plan(n) for n in (1, 2, 3)] == [[1], [2], [2, 1]]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 50])
@pytest.mark.parametrize("offset", [0, 1])
def test_one_evaluation_per_step_on_a_uniform_time_grid(steps, offset):
    _, model, _ = solve(steps, offset)
    grid = np.linspace(1.0, 1.0 / T, steps + 1)[:-1]  # every grid time but the last
    np.testing.assert_allclose(model.timesteps, T * grid - 1 + offset, rtol=0, atol=1e-3)  # float32 timesteps


def test_a_learned_variance_model_is_solved_on_its_noise_channels():
    x, _, noise = solve(11)
    x_learned, _, _ = solve(11, learned_variance=True, noise=noise)
    torch.testing.assert_close(x_learned, x, rtol=0, atol=0)


def test_steps_must_count_model_evaluations():
    diffusion = create_diffusion("ddpm")
    with pytest.raises(ValueError, match="number of model evaluations"):
        diffusion.sample(GaussianDenoiser(0), torch.zeros(1, 1, 2, 2), sampler="dpm_solver", steps="ddim50")
    cfg = load_config("configs/quickstart.py", [*TINY, "diffusion.objective=ddpm", "sample.sampler=dpm_solver"])
    cfg["sample"]["steps"] = "ddim50"  # a config file may set it; an override is typed by TINY's integer
    assert config_problems(cfg) == ["sample.steps='ddim50': dpm_solver takes a number of model evaluations; "
                                    "e.g. sample.steps=50"]
    cfg = load_config("configs/quickstart.py", [*TINY, "diffusion.objective=ddpm", "sample.sampler=dpm_solver",
                                                "sample.steps=7"])
    assert config_problems(cfg) == []
