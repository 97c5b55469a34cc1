"""FSDP for the trainer (PyTorch's FSDP2, ``fully_shard``): parameters, gradients and optimizer state are
split over the ranks, one unit per backbone block, then the root.

The state dicts here are always full (unsharded), in the format of an unsharded run, so that a checkpoint
written under FSDP loads in a one-process run or in tools/sample.py, and the other way round. Under FSDP
gathering them is a collective that every rank must join; the checkpoint states land on rank 0 only, on the CPU.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def shard(model: nn.Module, mesh, bf16: bool) -> None:
    """Shard ``model`` (a DiT, DiM or ZigMa) in place over the 1-D device ``mesh``.

    Each block is one unit, gathered just before it runs and freed after it; the root unit holds the
    embeddings and the final layer. ``bf16``: the model runs under bf16 autocast, and FSDP keeps autocast's
    numbers. The Linear layers, whose weights autocast casts to bf16 anyway, are gathered in bf16 and their
    gradients reduced in fp32. Everything autocast leaves in fp32 stays fp32: the root (its timestep input
    too), the residual stream (no input casts), norms, adaLN tables, a Mamba mixer's conv, dt_proj, A_log
    and D (the fp32 selective scan's parameters; its Linear layers are units of their own), and the DiT blocks that
    run in fp32 after a route (``fp32_after_route``).
    """
    marked = [name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)]
    low = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32_blocks = {route.end + 1 for route in model.router.routes} if getattr(model, "fp32_after_route", False) else ()
    for i, block in enumerate(model.blocks):
        policy = MixedPrecisionPolicy()
        if bf16 and i not in fp32_blocks:
            mixer = getattr(block, "mixer", None)
            if mixer is None:  # a DiT block: Linear layers only
                policy = low
            else:  # dt_proj is not called as a module: its weight and bias stay with the block
                for linear in [m for m in block.modules() if isinstance(m, nn.Linear) and m is not mixer.dt_proj]:
                    fully_shard(linear, mesh=mesh, mp_policy=low)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(output_dtype=torch.float32))
    params = dict(model.named_parameters())  # fully_shard replaced every parameter: carry the marks over
    for name in marked:
        params[name]._no_weight_decay = True


@contextmanager
def no_gradient_sync(model: nn.Module):
    """Accumulate gradients without reducing them (FSDP's ``no_sync``); the next backward outside reduces."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with full tensors (under FSDP: collective, filled on rank 0 only)."""
    return get_model_state_dict(module, options=_FULL) if is_sharded(module) else module.state_dict()


def gathered_state_dict(module: nn.Module) -> dict:
    """The full state dict of a sharded ``module`` on every rank, on its device (collective)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as an unsharded run has it: integer parameter ids, full tensors (under FSDP:
    collective, filled on rank 0 only)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    state = get_optimizer_state_dict(model, optimizer, options=_FULL)  # keyed by parameter names
    if not state:
        return {}
    ids = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {"state": {ids[name]: s for name, s in state["state"].items()},
            "param_groups": optimizer.state_dict()["param_groups"]}  # the same ids, in the same order


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full :func:`full_optimizer_state` (every rank passes it; under FSDP each keeps its shards)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):  # as saved: DCP makes tuples lists
        group.update((key, value) for key, value in saved.items() if key != "params")
