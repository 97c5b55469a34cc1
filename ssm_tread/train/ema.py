"""Exponential moving average of a model's weights, kept in fp32 and updated every step."""
import copy

import torch


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step; buffers are copied.

    ``ema.model`` is an fp32 copy of the model in eval mode, ready to sample from.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params, params = [], []
        for p, e in zip(model.parameters(), self.model.parameters()):
            if p.requires_grad:
                ema_params.append(e)
                params.append(p.detach().float())
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b, e in zip(model.buffers(), self.model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
