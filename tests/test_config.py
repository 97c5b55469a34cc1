"""Config files, inheritance, dotted overrides, and errors that name the fix."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from ssm_tread.train.config import ConfigError, apply_overrides, load_config

EXPERIMENTS = ["base", "quickstart", *(f"dit_{s}2{t}" for s in ("s", "b", "l", "xl") for t in ("", "_tread")),
               *(f"dim_{s}{t}" for s in ("l", "h") for t in ("", "_tread")), "zigma_b2", "zigma_b2_tread"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_loads(name):
    path = f"configs/{name}.py"
    cfg = load_config(path)
    assert cfg["_name"] in path
    assert {"model", "routing", "diffusion", "data", "optim", "train", "log", "sample", "eval"} <= set(cfg)


def test_experiments_extend_the_base():
    tread = load_config("configs/dit_xl2_tread.py")
    assert tread["model"]["name"] == "DiT-XL/2" and tread["routing"]["routes"] == [(2, 24, 0.5)]
    assert tread["optim"]["lr"] == 1e-4 and tread["train"]["ema_decay"] == 0.9999
    dim = load_config("configs/dim_l_tread.py")
    assert dim["optim"]["betas"] == (0.99, 0.99) and dim["optim"]["warmup_steps"] == 5000
    assert dim["routing"]["routes"] == [(2, 45, 0.5)]
    # the official configs/imagenet256_{L,H}_DiM.py: max_grad_norm 1.0, AdamW eps 1e-15
    for name in ("dim_l", "dim_h"):
        optim = load_config(f"configs/{name}.py")["optim"]
        assert (optim["grad_clip"], optim["eps"]) == (1.0, 1e-15), name
    zigma = load_config("configs/zigma_b2_tread.py")
    assert zigma["diffusion"]["objective"] == "flow" and zigma["optim"]["grad_clip"] == 2.0


def test_loads_do_not_leak_into_each_other():
    load_config("configs/dit_b2_tread.py")
    assert load_config("configs/dit_b2.py")["routing"]["routes"] == []
    assert load_config("configs/base.py")["model"]["name"] == "DiT-XL/2"


def test_threads_load_configs_at_once():
    # tools/bench/study.py loads configs from worker threads; each load edits sys.path and sys.modules
    paths = ["configs/dit_b2_tread.py", "configs/zigma_b2.py", "configs/quickstart.py"] * 16
    with ThreadPoolExecutor(max_workers=8) as pool:
        names = list(pool.map(lambda path: load_config(path)["model"]["name"], paths))
    assert names == ["DiT-B/2", "ZigMa-B/2", "DiM"] * 16


def test_overrides_are_typed_by_the_value_they_replace():
    cfg = load_config("configs/quickstart.py", [
        "train.steps=20", "optim.lr=2e-4", "log.tensorboard=false", "routing.routes=[(1, 3, 0.25)]",
        "optim.betas=(0.9, 0.95)", "model.kwargs.depth=7", "model.kwargs.d_conv=4", "sample.steps=10",
        "sample.sampler=euler", "train.run_dir=/tmp/x"])
    assert cfg["train"]["steps"] == 20 and cfg["optim"]["lr"] == 2e-4 and cfg["log"]["tensorboard"] is False
    assert cfg["routing"]["routes"] == [(1, 3, 0.25)] and cfg["optim"]["betas"] == (0.9, 0.95)
    assert cfg["model"]["kwargs"]["depth"] == 7 and cfg["model"]["kwargs"]["d_conv"] == 4
    assert cfg["sample"]["steps"] == 10 and cfg["sample"]["sampler"] == "euler"


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "expected int"),
    ("log.tensorboard=maybe", "expected bool"),
    ("routing.routes=3", "expected list"),
    ("train.steps", "group.key=value"),
])
def test_bad_override_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.py", [override])


@pytest.mark.parametrize("override, suggestion", [
    ("train.step=5", "train.steps"), ("optim.grad_clp=1", "optim.grad_clip"), ("trian.steps=5", "train.steps")])
def test_unknown_override_suggests_the_closest_key(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config("configs/quickstart.py", [override])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from quickstart import *\ntrain['ema_decy'] = 0.5\n")
    with pytest.raises(ConfigError, match="train.ema_decy.*did you mean 'train.ema_decay'"):
        load_config(path)


def test_unknown_group_in_a_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from base import *\noptimizer = dict(lr=1.0)\n")
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/no_such_config.py")


def test_nested_override_needs_a_dict():
    cfg = load_config("configs/quickstart.py")
    with pytest.raises(ConfigError, match="not a dict"):
        apply_overrides(cfg, ["train.steps.x=1"])
