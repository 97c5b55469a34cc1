"""Flow matching with SiT's linear interpolant.

    x_t = t * x + (1 - t) * noise,  t in [0, 1] (t = 0: pure noise, t = 1: data),
    target velocity dx_t/dt = x - noise.

Timesteps: the model receives ``time_scale * t`` (default 1000, so t in [0, 1000]), the range the
DiT-style sinusoidal timestep embedder is built for. Note the direction is opposite to DDPM's: a large
model timestep means clean data here. A model with 2C output channels (learn_sigma) has its extra
channels ignored, as in SiT.
"""

from __future__ import annotations

import math

import torch
from ssm_tread.progress import progress_bar

from ssm_tread.diffusion.common import check_choice, model_forward, rand, randn, reduce_loss
from ssm_tread.diffusion.guidance import Guidance


class FlowMatching:
    """Linear-interpolant flow matching; ``time_dist`` "uniform" or "logit_normal" (t = sigmoid(N(mean, std))).

    sde_norm: the Euler-Maruyama sampler's diffusion coefficient is ``w(t) = sde_norm * (1 - t)``
    (SiT's "sigma" form); 0 turns it into the Euler ODE.
    """

    samplers = ("euler", "heun", "euler_maruyama")
    default_sampler = "heun"
    default_steps = {"euler": 250, "heun": 50, "euler_maruyama": 250}

    def __init__(
        self,
        time_dist: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_scale: float = 1000.0,
        sde_norm: float = 1.0,
    ):
        check_choice("time_dist", time_dist, ("uniform", "logit_normal"))
        self.time_dist = time_dist
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.time_scale = time_scale
        self.sde_norm = sde_norm

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """x0 (data), noise [B, ...], t [B] -> (x_t, target velocity)."""
        t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return t * x0 + (1 - t) * noise, x0 - noise

    def sample_time(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Training times t [B] in [0, 1] from ``time_dist``."""
        if self.time_dist == "uniform":
            return rand(x0.shape[0], generator, x0.device)
        z = randn((x0.shape[0],), generator, x0.float())
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def training_losses(
        self, model, x0, model_kwargs=None, loss_type="full", noise=None, t=None, generator=None
    ) -> dict:
        """Per-sample losses [B]: "mse" of the velocity, equal to "loss"."""
        channels = x0.shape[1]
        if t is None:
            t = self.sample_time(x0, generator)
        if noise is None:
            noise = randn(x0.shape, generator, x0)
        x_t, target = self.interpolate(x0, noise, t)
        out, masks = model_forward(model, x_t, self.time_scale * t.float(), model_kwargs, loss_type)
        mse = reduce_loss((target - out[:, :channels]) ** 2, masks)
        return {"mse": mse, "loss": mse}

    def velocity(self, model, x: torch.Tensor, t: float, model_kwargs: dict, guidance: Guidance) -> torch.Tensor:
        """The model's velocity [B, C, ...] at interpolant time ``t`` for the whole batch."""
        model_t = torch.full((x.shape[0],), self.time_scale * t, device=x.device)
        return guidance(model, x, model_t, model_kwargs, t)[:, : x.shape[1]]

    @torch.no_grad()
    def sample(
        self, model, noise, model_kwargs=None, sampler=None, steps=None, guidance=None, progress=False, generator=None
    ) -> torch.Tensor:
        """Integrate from t = 0 (``noise``) to t = 1 on a uniform grid of ``steps`` steps.

        "euler" and "heun" (2 evaluations per step) solve the ODE dx/dt = v; "euler_maruyama" the SDE
        dx = [v + w(t)/2 * score] dt + sqrt(w(t)) dW, score = -(x - t v) / (1 - t), with no noise added
        on the last step.
        """
        sampler = sampler or self.default_sampler
        check_choice("sampler", sampler, self.samplers)
        steps = int(steps or self.default_steps[sampler])
        model_kwargs = model_kwargs or {}
        guidance = guidance or Guidance()  # the default: a plain model call
        times = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
        x = noise
        for i in progress_bar(range(steps), enabled=progress):
            t, dt = times[i], times[i + 1] - times[i]
            v = self.velocity(model, x, t, model_kwargs, guidance)
            if sampler == "euler":
                x = x + dt * v
            elif sampler == "heun":
                v_next = self.velocity(model, x + dt * v, times[i + 1], model_kwargs, guidance)
                x = x + dt * (v + v_next) / 2
            else:
                drift = v - 0.5 * self.sde_norm * (x - t * v)  # v + w(t)/2 * score, the 1/(1-t) cancels
                x = x + dt * drift
                if i < steps - 1:
                    x = x + math.sqrt(self.sde_norm * (1 - t) * dt) * randn(x.shape, generator, x)
        return x
