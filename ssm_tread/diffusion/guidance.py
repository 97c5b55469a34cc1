"""Classifier-free guidance, guidance intervals and TREAD routing guidance.

A sampler asks :class:`Guidance` for the model output at each step instead of calling the model
itself: ``guidance(model, x, t, model_kwargs, time)``, where ``t`` [B] is what the model receives and
``time`` is the step's position in the objective's normalised time in [0, 1]:

- ddpm: ``time = original_timestep / (num_timesteps - 1)`` (0 = data, 1 = pure noise);
- flow: ``time = t`` of the interpolant (0 = pure noise, 1 = data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


def cfg_combine(
    cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float, guided_channels: int | None = None
) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` on the first ``guided_channels`` channels (dim 1; None: all).

    The other channels (e.g. the variance interpolation of a learned-sigma model) come from ``cond_out``.
    ``guided_channels=3`` on a 4-channel latent reproduces the reference DiT.
    """
    c = cond_out.shape[1] if guided_channels is None else guided_channels
    guided = uncond_out[:, :c] + scale * (cond_out[:, :c] - uncond_out[:, :c])
    return torch.cat([guided, cond_out[:, c:]], dim=1)


class RoutingGuidance(NamedTuple):
    """TREAD routing guidance: ``v(high) + scale * (v(low) - v(high))`` with forced routing at both ratios."""

    low: float
    high: float
    scale: float


@dataclass
class Guidance:
    """How a sampler evaluates the model.

    cfg_scale: classifier-free guidance scale (1.0: none). The conditional and the unconditional
        (label ``model.num_classes``) halves are evaluated in one batched call; needs ``model_kwargs["y"]``.
    interval: (lo, hi) in normalised time (see the module docstring); outside it all guidance is off
        and the model is called once, unguided. None: guide at every step.
    guided_channels: guide only the first channels (3 reproduces the reference DiT); None: the model's
        prediction channels, ``model.in_channels`` of a learned-sigma model (its variance channels then
        come from the conditional half, as in the reference DiT), else all.
    routing: RoutingGuidance or (low, high, scale), 0 <= low < high < 1: evaluate with
        ``model.router.forced(ratio=low)`` and ``forced(ratio=high)`` and extrapolate towards the less
        routed output. Combined with cfg_scale, each of the two evaluations is itself CFG-guided.
    """

    cfg_scale: float = 1.0
    interval: tuple[float, float] | None = None
    guided_channels: int | None = None
    routing: RoutingGuidance | tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.interval is not None:
            lo, hi = self.interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance interval {self.interval} needs 0 <= lo <= hi <= 1")
        if self.routing is not None:
            self.routing = RoutingGuidance(*self.routing)
            if not 0.0 <= self.routing.low < self.routing.high < 1.0:
                raise ValueError(f"routing guidance {self.routing} needs 0 <= low < high < 1")

    def channels(self, model) -> int | None:
        """How many leading output channels are guided (None: all)."""
        if self.guided_channels is None and getattr(model, "learn_sigma", False):
            return model.in_channels
        return self.guided_channels

    def active(self, time: float) -> bool:
        return self.interval is None or self.interval[0] <= time <= self.interval[1]

    def __call__(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict, time: float) -> torch.Tensor:
        if not self.active(time):
            return model(x, t, **model_kwargs)
        if self.routing is None:
            return self._cfg(model, x, t, model_kwargs)
        low, high, scale = self.routing
        with model.router.forced(ratio=low):
            out_low = self._cfg(model, x, t, model_kwargs)
        with model.router.forced(ratio=high):
            out_high = self._cfg(model, x, t, model_kwargs)
        return cfg_combine(out_low, out_high, scale, self.channels(model))

    def _cfg(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        if self.cfg_scale == 1.0:
            return model(x, t, **model_kwargs)
        if "y" not in model_kwargs:
            raise ValueError("classifier-free guidance needs class labels in model_kwargs['y']")
        y = model_kwargs["y"]
        both = {k: torch.cat([v, v]) for k, v in model_kwargs.items()}  # [2B, ...]
        both["y"] = torch.cat([y, torch.full_like(y, model.num_classes)])
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return cfg_combine(cond, uncond, self.cfg_scale, self.channels(model))
