"""FSDP (train.fsdp): 2 gloo processes match one unsharded process, checkpoints keep the unsharded format
and resume, and the bf16 policy computes what autocast computes."""
import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import model_inputs, randomize_zero_parameters
from PIL import Image
from test_train import tiny, torchrun_train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ssm_tread.models import create_model
from ssm_tread.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from ssm_tread.train.config import ConfigError
from ssm_tread.train.fsdp import shard
from ssm_tread.train.trainer import train

SAME = ["model.class_dropout_prob=0.0", "sample.cfg_scale=1.0", "routing.routes=[]"]  # no per-rank randomness
DIM = ["model.name=DiM", "model.kwargs={'hidden_size': 16, 'depth': 3, 'patch_size': 4, 'd_state': 4, 'expand': 1}"]
CLOSE = {"rtol": 1e-4, "atol": 1e-6}


def fsdp_run(run_dir, *overrides):
    """tools/train.py on 2 gloo processes with train.fsdp=true."""
    done = torchrun_train(run_dir, "train.fsdp=true", *overrides, timeout=300)
    assert "2 rank(s) on cpu (FSDP)" in done.stdout


def assert_same_checkpoint(a, b):
    """Two checkpoints hold the same model, EMA, optimizer (same integer parameter ids, same rates) and step."""
    for key in ("model", "ema"):
        assert list(a[key]) == list(b[key]), key
        for name, value in b[key].items():
            torch.testing.assert_close(a[key][name], value, **CLOSE, msg=f"{key} {name}")
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert sorted(opt_a["state"]) == sorted(opt_b["state"])
    for i, state in opt_b["state"].items():
        assert set(opt_a["state"][i]) == set(state)
        for name, value in state.items():
            torch.testing.assert_close(opt_a["state"][i][name], value, **CLOSE, msg=f"optimizer {i} {name}")
    assert a["step"] == b["step"]


def test_fsdp_dim_matches_one_process_and_checkpoints_cross_over(tmp_path, capsys):
    """DiM (every Mamba block sharded), gradient accumulation and clipping. An FSDP run's step-2 checkpoint
    equals one process's, format included. That one-process checkpoint (with the two ranks' RNG states) resumes
    under FSDP and reproduces the uninterrupted run; the FSDP checkpoint at step 4 loads in a plain model and
    continues in a one-process run, where train.fsdp has nothing to shard."""
    same = [*DIM, *SAME, "train.ckpt_every=2", "train.grad_accum=2", "optim.grad_clip=0.05"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny(one, *same, "train.steps=4"))
    fsdp_run(two, *same, "train.steps=2")
    first_half = load_checkpoint(checkpoint_path(two / "checkpoints", 2))
    unsharded = load_checkpoint(checkpoint_path(one / "checkpoints", 2))
    assert len(first_half["rng"]) == 2
    assert_same_checkpoint(first_half, unsharded)

    unsharded["rng"] = first_half["rng"]
    save_checkpoint(unsharded, two / "checkpoints" / "step-0000002.pt")
    fsdp_run(two, *same, "train.steps=4", "train.resume=auto")
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [row["step"] for row in metrics[1]] == [1, 2, 3, 4]
    for a, b in zip(*metrics):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert a["grad_norm"] > 0.05  # clipped
    end = load_checkpoint(checkpoint_path(two / "checkpoints", 4))
    assert_same_checkpoint(end, load_checkpoint(checkpoint_path(one / "checkpoints", 4)))

    load_weights(create_model(end["model_name"], **end["model_kwargs"]), end["ema"], "the FSDP checkpoint")
    capsys.readouterr()
    summary = train(tiny(tmp_path / "on", *same, "train.steps=5", "train.fsdp=true", f"train.resume={end['path']}"))
    assert summary["step"] == 5 and "nothing to shard" in capsys.readouterr().out


def test_fsdp_dit_matches_one_process_and_samples_the_gathered_ema(tmp_path):
    """DiT: two FSDP ranks end where one process ends; the sample grids come from the gathered EMA weights,
    so the final grid is the one-process run's (a fast-moving EMA: the grid of its step-1 weights differs by
    0.57 levels on average)."""
    same = [*SAME, "train.steps=3", "train.ckpt_every=0", "log.grid_every=2", "train.ema_decay=0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny(one, *same))
    fsdp_run(two, *same)
    assert_same_checkpoint(load_checkpoint(two / "checkpoints"), load_checkpoint(one / "checkpoints"))
    assert (two / "grids" / "step-0000002.png").is_file()
    grids = [np.asarray(Image.open(run / "samples.png"), dtype=float) for run in (one, two)]
    assert np.abs(grids[0] - grids[1]).mean() < 0.1


def test_fsdp_does_not_combine_with_compile(tmp_path):
    with pytest.raises(ConfigError, match="train.compile=false or train.fsdp=false"):
        train(tiny(tmp_path, "train.fsdp=true", "train.compile=true"))


def tiny_model(name):
    torch.manual_seed(0)
    size = {"num_heads": 2} if name == "DiT" else {"d_state": 4, "expand": 1}
    model = create_model(name, input_size=16, in_channels=1, num_classes=10, learn_sigma=False, hidden_size=16,
                         depth=3, patch_size=4, routes=[(0, 0, 0.5)], **size)
    randomize_zero_parameters(model)
    return model


@pytest.mark.parametrize("name, bf16_params", [
    ("DiT", r"blocks\.[02]\."),  # block 1 runs in fp32 after the route (fp32_after_route)
    ("DiM", r"blocks\.\d\.(skip_linear|mixer\.(in_proj|x_proj|out_proj))\."),  # not A_log, D, dt_proj, conv1d
    ("ZigMa", r"blocks\.\d\.(adaLN_modulation\.1|mixer\.(in_proj|x_proj|out_proj))\."),
])
def test_bf16_policy_computes_what_autocast_computes(name, bf16_params):
    """shard(bf16=True) under bf16 autocast gathers exactly the Linear layers autocast runs in bf16 in bf16, and
    the output and the gradients equal those of autocast on the unsharded model (one gloo rank)."""
    reference = tiny_model(name)
    model = copy.deepcopy(reference)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard(model, init_device_mesh("cpu", (1,)), bf16=True)
        gathered = {}  # parameter name -> dtype while its unit is gathered

        def record(module, args):
            gathered.update((n, p.dtype) for n, p in model.named_parameters() if not isinstance(p, DTensor))

        for module in model.modules():
            module.register_forward_pre_hook(record)
        x, t, y = model_inputs(batch=4, size=16, channels=1)
        outputs = []
        for m in (reference, model):
            torch.manual_seed(1)  # the same routing selection
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x, t, y)
            out.float().square().mean().backward()
            outputs.append(out)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()

    names = [n for n, _ in reference.named_parameters()]
    assert sorted(gathered) == sorted(names)
    assert {n for n, dtype in gathered.items() if dtype == torch.bfloat16} == {n for n in names if re.match(bf16_params, n)}
    assert {dtype for dtype in gathered.values()} == {torch.bfloat16, torch.float32}
    assert outputs[0].dtype == torch.bfloat16 and outputs[1].dtype == torch.float32  # the root returns fp32
    torch.testing.assert_close(outputs[1], outputs[0].float(), rtol=1e-5, atol=1e-6)
    for n, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-9, msg=n)
