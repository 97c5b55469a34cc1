"""What both objectives share: reproducible draws, the model call, and the full or routed loss average."""

from __future__ import annotations

import torch

LOSS_TYPES = ("full", "routed")


def check_choice(kind: str, name: str, valid) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(map(repr, valid))}")


def randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws shaped ``shape`` on ``like``'s device and dtype, from ``generator`` if given."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def randint(high: int, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high), long [batch]."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (batch,), generator=generator, device=gen_device).to(device)


def rand(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform draws in [0, 1), float32 [batch]."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(batch, generator=generator, device=gen_device).to(device)


def model_forward(model, x_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None, loss_type: str):
    """Call ``model(x_t, t, **model_kwargs)``; returns (out [B, C', H, W], masks [R, B, H, W] or None)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    model_kwargs = model_kwargs or {}
    if loss_type == "routed":
        return model(x_t, t, **model_kwargs, return_masks=True)
    return model(x_t, t, **model_kwargs), None


def reduce_loss(elementwise: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Per-sample average of an elementwise loss [B, C, H, W] -> [B].

    Without masks (or with R = 0 routes): the mean over all elements. With masks [R, B, H, W] (TREAD's
    adapted loss): per route the mean over the positions that route processed (all channels), then
    the mean over routes.
    """
    if masks is None or masks.shape[0] == 0:
        return elementwise.flatten(1).mean(dim=1)
    weight = masks[:, :, None].to(elementwise.dtype)  # [R, B, 1, H, W]
    per_route = (elementwise[None] * weight).sum(dim=(2, 3, 4))  # [R, B]
    count = weight.sum(dim=(2, 3, 4)) * elementwise.shape[1]  # [R, B]
    return (per_route / count).mean(dim=0)
