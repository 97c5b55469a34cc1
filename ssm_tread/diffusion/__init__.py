"""Diffusion objectives, samplers and guidance.

``create_diffusion("ddpm", ...)`` -> :class:`GaussianDiffusion` (DiT protocol: 1000 steps, linear
betas, eps prediction, learned variance when the model outputs 2C channels). The model receives the
original timestep 0..999 (0 = clean).

``create_diffusion("flow", ...)`` -> :class:`FlowMatching` (SiT's linear interpolant, t = 1 is data,
velocity target). The model receives ``time_scale * t``, by default 1000 * t (1000 = clean).

Both offer ``sample_time(x0, generator=None)`` (training times t [B]), ``training_losses(model, x0,
model_kwargs, loss_type="full"|"routed", noise=None, t=None, generator=None) -> dict`` with "loss" [B],
``sample(model, noise, model_kwargs, sampler=None, steps=None, guidance=None, progress=False,
generator=None) -> x0``, ``samplers`` and ``default_sampler``.
"""

from ssm_tread.diffusion.common import LOSS_TYPES, check_choice, reduce_loss
from ssm_tread.diffusion.flow import FlowMatching
from ssm_tread.diffusion.gaussian import (
    BETA_SCHEDULES,
    GaussianDiffusion,
    create_gaussian_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)
from ssm_tread.diffusion.guidance import Guidance, RoutingGuidance, cfg_combine

OBJECTIVES = ("ddpm", "flow")


def create_diffusion(objective: str = "ddpm", **kwargs) -> GaussianDiffusion | FlowMatching:
    """ddpm kwargs: num_timesteps=1000, schedule="linear"|"cosine"|"scaled_linear", fixed_variance="large"|"small",
    clip_denoised=False, ddim_eta=0.0, timestep_offset=0. flow kwargs: time_dist="uniform"|"logit_normal", logit_mean=0.0,
    logit_std=1.0, time_scale=1000.0, sde_norm=1.0."""
    check_choice("objective", objective, OBJECTIVES)
    if objective == "ddpm":
        return create_gaussian_diffusion(**kwargs)
    return FlowMatching(**kwargs)


__all__ = [
    "BETA_SCHEDULES",
    "LOSS_TYPES",
    "OBJECTIVES",
    "FlowMatching",
    "GaussianDiffusion",
    "Guidance",
    "RoutingGuidance",
    "cfg_combine",
    "create_diffusion",
    "create_gaussian_diffusion",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "reduce_loss",
    "space_timesteps",
]
