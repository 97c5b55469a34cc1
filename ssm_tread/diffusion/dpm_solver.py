"""DPM-Solver++ on a discrete-time DDPM: the sampler of the official DiM evaluation (50 steps).

Lu et al., "DPM-Solver" (2022) and "DPM-Solver++" (2022). The discrete schedule becomes continuous as in
DPM-Solver: the T training timesteps sit at t_n = n / T (n = 1..T), with ``log alpha_t`` piecewise
linear in t between them, ``alpha_t^2 = abar``, ``sigma_t^2 = 1 - abar`` and the half log-SNR
``lambda_t = log(alpha_t / sigma_t)``. Sampling runs from t = 1 to t = 1 / T over ``steps`` equal
intervals of t, one model evaluation per interval: single-step updates of order 3, each spanning three
intervals with its two intermediate evaluations on the inner grid points, and a last update of order 1
or 2 where ``steps`` is not a multiple of 3 (DPM-Solver-fast's order plan). The updates are
DPM-Solver++'s, on the data prediction ``x0 = (x_t - sigma_t eps) / alpha_t``.

The model receives ``T t - 1 + timestep_offset``: the training timestep at every grid point, T t for
models trained on n = 1..T (DiM), which is what the official DiM evaluation passes.
"""

from __future__ import annotations

import math

import torch


def order_plan(steps: int) -> list[int]:
    """The orders of the single-step updates that use ``steps`` model evaluations (they sum to ``steps``)."""
    k, rest = divmod(steps, 3)
    return [3] * k + [rest] if rest else [3] * (k - 1) + [2, 1]


class DiscreteSchedule:
    """``alpha_t``, ``sigma_t`` and ``lambda_t`` of a discrete DDPM at continuous t in [1/T, 1]."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.num_timesteps = len(alphas_cumprod)
        self.log_alphas = (0.5 * torch.log(alphas_cumprod.double())).tolist()  # at t_n = n / T, n = 1..T

    def log_alpha(self, t: float) -> float:
        position = t * self.num_timesteps - 1  # 0 at t = 1/T, T - 1 at t = 1
        if not -1e-9 <= position <= self.num_timesteps - 1 + 1e-9:
            raise ValueError(f"t = {t} is outside [1/T, 1] of the discrete schedule (T = {self.num_timesteps})")
        n = min(max(math.floor(position), 0), self.num_timesteps - 2)
        frac = position - n
        return (1 - frac) * self.log_alphas[n] + frac * self.log_alphas[n + 1]

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def sigma(self, t: float) -> float:
        return math.sqrt(-math.expm1(2 * self.log_alpha(t)))

    def lam(self, t: float) -> float:
        return math.log(self.alpha(t) / self.sigma(t))


def dpm_solver_sample(data_prediction, x: torch.Tensor, schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Solve the probability-flow ODE from x [B, ...] at t = 1 to t = 1/T with ``steps`` evaluations of
    ``data_prediction(x, t) -> x0`` (t a float)."""
    if steps < 1:
        raise ValueError(f"DPM-Solver needs at least one step, got {steps}")
    grid = torch.linspace(1.0, 1.0 / schedule.num_timesteps, steps + 1, dtype=torch.float64).tolist()
    i = 0
    for order in order_plan(steps):
        x = dpm_solver_update(data_prediction, x, schedule, grid[i:i + order + 1])
        i += order
    return x


def dpm_solver_update(data_prediction, x: torch.Tensor, schedule: DiscreteSchedule, times: list[float]) -> torch.Tensor:
    """One DPM-Solver++ step of order len(times) - 1 from times[0] to times[-1], evaluating the model at
    every time but the last. With h = lambda_t - lambda_s and r_k the fractions of h at the inner times:

    order 1: x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D_s (DDIM);
    order 2: that, minus alpha_t (e^-h - 1) (D_1 - D_s) / (2 r_1), D_1 taken at the order-1 point of s_1;
    order 3: the order-2 point of s_2 from D_s and D_1, then x_t from D_s and D_2 with the phi_2 term.
    """
    s, t = times[0], times[-1]
    sigma, alpha, lam = schedule.sigma, schedule.alpha, schedule.lam
    h = lam(t) - lam(s)
    d_s = data_prediction(x, s)

    def first_order(to: float) -> torch.Tensor:  # DPM-Solver-1 (DDIM) from s to ``to``
        return (sigma(to) / sigma(s)) * x - alpha(to) * math.expm1(lam(s) - lam(to)) * d_s

    order = len(times) - 1
    if order == 1:
        return first_order(t)
    r1 = (lam(times[1]) - lam(s)) / h
    d_1 = data_prediction(first_order(times[1]), times[1])
    phi_1 = math.expm1(-h)
    if order == 2:
        return first_order(t) - (0.5 / r1) * alpha(t) * phi_1 * (d_1 - d_s)
    r2 = (lam(times[2]) - lam(s)) / h
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1
    x_2 = first_order(times[2]) + (r2 / r1) * alpha(times[2]) * phi_22 * (d_1 - d_s)
    d_2 = data_prediction(x_2, times[2])
    phi_2 = phi_1 / h + 1
    return first_order(t) + (1 / r2) * alpha(t) * phi_2 * (d_2 - d_s)
