"""Exponential moving average of a model's weights, kept in fp32 and updated every step."""
import copy

import torch
from torch.distributed.fsdp import fully_shard

from ssm_tread.train.fsdp import full_state_dict, gathered_state_dict, is_sharded


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step; buffers are copied.

    ``ema.model`` is an fp32 copy of the model in eval mode. Under FSDP (after :meth:`shard`) it holds
    shards like the model's and each rank averages its own; sample from :meth:`sampling_model`.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._skeleton = None  # under FSDP: the copy with its buffers but parameters on the meta device

    def shard(self, mesh) -> None:
        """Shard the copy over ``mesh`` like :func:`ssm_tread.train.fsdp.shard` shards the model (every
        parameter split along its first dimension, so each rank's EMA shards line up with its model shards)."""
        meta = {id(p): torch.nn.Parameter(p.to("meta"), requires_grad=False) for p in self.model.parameters()}
        self._skeleton = copy.deepcopy(self.model, meta)
        fully_shard(self.model, mesh=mesh)

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
        """Full weights; once sharded, a collective every rank joins, filled on rank 0 only."""
        return full_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        """Load full weights (before :meth:`shard`)."""
        self.model.load_state_dict(state)

    def sampling_model(self) -> torch.nn.Module:
        """A model with the EMA weights to sample from: ``self.model``, or once sharded, a plain copy of the
        gathered full weights (a collective every rank joins; each gets its own copy)."""
        if not is_sharded(self.model):
            return self.model
        model = copy.deepcopy(self._skeleton)
        model.load_state_dict(gathered_state_dict(self.model), assign=True)
        return model
