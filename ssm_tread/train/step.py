"""One training step: forward and loss over the micro-batches, backward, gradient clipping, the optimizer,
the learning-rate schedule and the EMA. The trainer, the step benchmark and the convergence study all run
this step.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from ssm_tread.train.config import ConfigError


def lr_factor(step: int, optim: dict, total: int) -> float:
    """Linear warm-up to 1, then constant or cosine down to min_lr / lr."""
    warmup = optim["warmup_steps"]
    if step < warmup:
        return (step + 1) / warmup
    if optim["schedule"] == "constant":
        return 1.0
    if optim["schedule"] == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = optim["min_lr"] / optim["lr"]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule={optim['schedule']!r}; choose 'constant' or 'cosine'")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and kernels; none on biases, norm gains and
    parameters marked ``_no_weight_decay`` (Mamba's A_log and D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: dict, total_steps: int):
    """(AdamW, its LambdaLR schedule) from the ``optim`` config group, for a run of ``total_steps``."""
    optimizer = torch.optim.AdamW(parameter_groups(model, optim["weight_decay"]), lr=optim["lr"],
                                  betas=tuple(optim["betas"]), eps=optim["eps"])
    return optimizer, schedule_at(optimizer, optim, total_steps, 0)


def schedule_at(optimizer: torch.optim.Optimizer, optim: dict, total_steps: int, step: int):
    """The LambdaLR of ``optimizer`` positioned at ``step`` (its rate ``optim.lr * lr_factor(step)``), after the
    ``optim`` settings go onto the groups of :func:`parameter_groups`, over any a loaded optimizer state
    brought: the rate is a function of the config and the step, so a resumed run follows the config given now."""
    decay, no_decay = optimizer.param_groups
    for group, weight_decay in ((decay, optim["weight_decay"]), (no_decay, 0.0)):
        group.update(lr=optim["lr"], initial_lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
                     weight_decay=weight_decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, total_steps), step - 1)


class TrainStep:
    """Calling it, ``train_step(micro_batches)``, runs one optimizer step and returns (mean loss, gradient norm
    before clipping).

    It is two halves, so that a caller can look at the loss before the weights change:
    :meth:`backward` (forward, loss and backward of every micro-batch, gradients averaged over them) and
    :meth:`update` (clip, optimizer, schedule, zero the gradients, EMA).

    ``model``: what the forward runs (possibly wrapped by DDP or torch.compile; the EMA averages its
    parameters). ``no_sync(model)``: a context that skips the gradient all-reduce of the micro-batches
    before the last (DDP's ``no_sync``, FSDP's; default none). A micro-batch is ``(x, y, noise, t)``;
    ``noise`` and ``t`` may be None, then the objective draws them.
    """

    def __init__(self, model: nn.Module, diffusion, optimizer: torch.optim.Optimizer, scheduler=None, ema=None,
                 loss_type: str = "full", grad_clip: float = 0.0, no_sync=None):
        self.model, self.diffusion, self.optimizer, self.scheduler, self.ema = model, diffusion, optimizer, scheduler, ema
        self.loss_type, self.grad_clip = loss_type, grad_clip
        self.no_sync = no_sync or (lambda model: nullcontext())

    def loss(self, x: torch.Tensor, y: torch.Tensor, noise=None, t=None) -> torch.Tensor:
        """The mean training loss of one micro-batch (a scalar with its graph)."""
        losses = self.diffusion.training_losses(self.model, x, {"y": y}, loss_type=self.loss_type, noise=noise, t=t)
        return losses["loss"].mean()

    def backward(self, micro_batches: list) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns the mean loss (detached)."""
        total = 0.0
        for j, (x, y, noise, t) in enumerate(micro_batches):
            with self.no_sync(self.model) if j < len(micro_batches) - 1 else nullcontext():
                loss = self.loss(x, y, noise, t)
                (loss / len(micro_batches)).backward()
            total = total + loss.detach()
        return total / len(micro_batches)

    def update(self) -> torch.Tensor:
        """Clip (``grad_clip`` > 0), step the optimizer and the schedule, zero the gradients, update the EMA.
        Returns the total gradient norm before clipping."""
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(),
                                             self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return grad_norm

    def __call__(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.backward(micro_batches)
        return loss, self.update()
