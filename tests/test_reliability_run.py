"""A run's life through tools/train.py: overwriting is asked for on the command line only, a torn metrics
line and a finished run on --resume, signals (stop within seconds, exit 128 + the signal's number, a
second Ctrl-C while exiting), errors printed once under torchrun and naming a missing path, route and
model errors blamed on their own keys, grid classes checked where grids are drawn, loader workers sized
to the machine, and what git ignores. Each case runs the real tool where it can (under a
tests/faults.py fault where the moment cannot be staged otherwise)."""
import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, assert_fails_in_one_line, run_tool
from test_reliability_io import LATENT, latents  # noqa: F401 (a fixture)
from test_train import TINY

from ssm_tread.checkpoint import latest_checkpoint, load_checkpoint
from ssm_tread.train.config import ConfigError, grid_classes, load_config


def train_tool(run_dir, *args, fault=None, env=None):
    return run_tool("tools/train.py", "configs/quickstart.py", *TINY, f"train.run_dir={run_dir}", *args, fault=fault,
                    env=env)


def test_a_second_run_without_resume_keeps_the_first_and_says_what_to_do(tmp_path):
    assert train_tool(tmp_path, "train.steps=2").returncode == 0
    done = train_tool(tmp_path, "train.steps=2", "optim.lr=2e-3")
    assert_fails_in_one_line(done, 1, "already holds checkpoints", "--resume", "--overwrite")
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["config"]["optim"]["lr"] == 1e-3
    done = train_tool(tmp_path, "train.steps=2", "optim.lr=2e-3", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["config"]["optim"]["lr"] == 2e-3


def test_no_config_can_overwrite_a_run(tmp_path):
    with pytest.raises(ConfigError, match="train.overwrite is no longer a config key: .*--overwrite"):
        load_config("configs/quickstart.py", ["train.overwrite=true"])
    (tmp_path / "mine.py").write_text("from quickstart import *\ntrain['overwrite'] = True\n")
    with pytest.raises(ConfigError, match="tools/train.py --overwrite"):
        load_config(tmp_path / "mine.py")


@pytest.mark.parametrize("path, ignored", [("checkpoints/sd-vae-ft-ema/config.json", True),
                                           ("data/imagenet256_latents/index.json", True),
                                           ("samples/dim_l_tread.npz", True), ("runs/quickstart/eval.json", True),
                                           ("ssm_tread/data/latents.py", False)])
def test_the_readmes_folders_are_git_ignored(path, ignored):
    done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert (done.returncode == 0) == ignored


def test_resume_drops_a_torn_last_metrics_line_and_says_so(tmp_path):
    assert train_tool(tmp_path, "train.steps=2", "train.ckpt_every=1").returncode == 0
    metrics = tmp_path / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[:-len(text.splitlines()[-1]) // 2 - 1])  # half of step 2's line: a full disk
    done = train_tool(tmp_path, "train.steps=3", "--resume")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{metrics}: dropping its torn last line 2" in done.stdout
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 3]


def test_resume_of_a_finished_run_says_it_is_complete(tmp_path):
    assert train_tool(tmp_path, "train.steps=2").returncode == 0
    done = train_tool(tmp_path, "train.steps=2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the run is complete at step 2 (train.steps=2): nothing to train" in done.stdout
    assert "resume with a larger train.steps" in done.stdout


@pytest.mark.parametrize("override, line", [
    ("routing.routes=[1,1,0.5]", "error: routing.routes=[1, 1, 0.5]: route 0 1: give a Route"),
    ("model.kwargs.router_ratio=0.5", "error: model.kwargs={'hidden_size': 32, 'depth': 3, 'num_heads': 2, "
                                      "'patch_size': 4, 'router_ratio': 0.5}: DiT: unknown argument(s) router_ratio")])
def test_a_bad_route_is_blamed_on_the_routes_and_a_bad_keyword_on_the_model(tmp_path, override, line):
    done = train_tool(tmp_path, override)
    assert_fails_in_one_line(done, 2, line)
    assert "0 <= start <= end < 3" in done.stderr or "fix the model's keyword arguments" in done.stderr


def test_grid_classes_are_checked_only_where_grids_are_drawn(latents, tmp_path):
    imagenet_ids = "sample.grid_classes=[207, 360, 387]"  # the 10-class latents have no such classes
    done = train_tool(tmp_path / "off", *LATENT, f"data.root={latents}", "train.steps=1", imagenet_ids)
    assert done.returncode == 0, done.stderr[-3000:]
    done = train_tool(tmp_path / "on", *LATENT, f"data.root={latents}", "log.grid_every=1", imagenet_ids)
    assert_fails_in_one_line(done, 2, "sample.grid_classes=[207, 360, 387]: needs a list of classes in 0..9",
                             lines=2)  # and the missing VAE


def test_grid_classes_default_to_classes_of_the_data_set():
    assert grid_classes({"grid_classes": None}, 10) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert grid_classes({"grid_classes": None}, 3) == [0, 1, 2]
    assert grid_classes({"grid_classes": None}, 1000) == [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's samples
    assert grid_classes({"grid_classes": (4, 2)}, 10) == [4, 2]
    assert load_config("configs/dit_b2.py")["sample"]["grid_classes"] is None


def test_sigterm_during_a_sample_grid_abandons_it_saves_and_exits_143(tmp_path):
    done = train_tool(tmp_path, "train.steps=5", "train.ckpt_every=0", "log.grid_every=1",
                      fault="sigterm-while-sampling")
    assert done.returncode == 128 + 15 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-3000:])
    assert done.stdout.count("fault: sampling") == 1 and not (tmp_path / "grids" / "step-0000001.png").exists()
    assert "stopped by SIGTERM at step 1" in done.stdout
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 1


def test_sigterm_during_an_evaluation_abandons_it_saves_and_exits_143(tmp_path):
    done = train_tool(tmp_path, "train.steps=5", "eval.num_samples=40", "eval.every=1", "sample.batch_size=4",
                      fault="sigterm-while-sampling")  # 10 chunks; the signal comes at the first
    assert done.returncode == 128 + 15 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-3000:])
    assert done.stdout.count("fault: sampling") == 1
    assert "eval/fid" not in (tmp_path / "metrics.jsonl").read_text() and not (tmp_path / "eval.json").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 1


def test_a_second_ctrl_c_while_exiting_is_quiet(tmp_path):
    done = train_tool(tmp_path, fault="ctrl-c-twice")
    assert_fails_in_one_line(done, 130, "error: interrupted (Ctrl-C)")


def test_an_expected_error_is_printed_by_rank_0_only(tmp_path):
    for rank, lines in (("0", 1), ("1", 0)):
        done = train_tool(tmp_path, "train.steps=0", env={"RANK": rank, "WORLD_SIZE": "2"})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.stderr.count("error: train.steps=0: must be >= 1") == lines, (rank, done.stderr)


def test_a_missing_path_is_named_with_what_is_wrong(tmp_path, capsys, monkeypatch):
    from tools.cli import run_tool as run_main

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # run_tool's exit handler stays out of pytest

    missing = tmp_path / "samples.npz"
    for error, what in ((FileNotFoundError, "does not exist"), (IsADirectoryError, "is a folder, not a file")):
        with pytest.raises(SystemExit) as exit_:
            run_main(lambda: open(missing if error is FileNotFoundError else tmp_path), expected=(OSError,))
        assert exit_.value.code == 1
        assert capsys.readouterr().err.splitlines() == [
            f"error: {missing if error is FileNotFoundError else tmp_path}: {what}; check the path"]


def test_loader_workers_and_shares_fit_the_machine(monkeypatch):
    from ssm_tread.machine import loader_workers, share

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert (loader_workers(1), loader_workers(2)) == (1, 0)  # 2 cores: one worker beside one rank, none for two
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert (loader_workers(8), loader_workers(32)) == (4, 1)
    assert (share(10_000, 300, 2), share(32, 1000, 8), share(32, 5, 8)) == (150, 32, 1)


def test_loader_workers_are_sized_by_the_ranks_of_one_node(monkeypatch):
    from ssm_tread.machine import node_ranks

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert node_ranks() == 1
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert node_ranks() == 16  # launched without torchrun's per-node count: all ranks on this node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun on 2 nodes of 8
    assert node_ranks() == 8


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
def test_a_run_sizes_its_loader_workers_to_its_cpus(tmp_path):
    (tmp_path / "mine.py").write_text("from quickstart import *\ndata['num_workers'] = None\n")
    done = subprocess.run([sys.executable, "tools/train.py", tmp_path / "mine.py", *TINY, "train.steps=1",
                           f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT,
                          check=False, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 loader worker(s)" in done.stdout  # one CPU: the rank loads its own batches
