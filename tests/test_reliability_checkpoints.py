"""Nothing a user does loses or silently corrupts work: checksummed checkpoints and the fallback to the newest
good one, finite-only checkpoints, pruning that keeps the newest, resume semantics, the run-dir lock, and
training draws that evaluation and sample grids leave alone. Each case runs the real tools/train.py or
tools/sample.py on a tiny DiT (4 steps, checkpoints at steps 2 and 4)."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, assert_fails_in_one_line, run_tool
from test_train import TINY, losses

from ssm_tread.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint


# A process that takes a run dir's lock and waits (runlock.py loaded alone: no torch, starts in no time).
LOCK_HOLDER = """import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runlock", "ssm_tread/train/runlock.py")
runlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runlock)
runlock.RunLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(300)
"""


def train_tool(run_dir, *overrides, fault=None):
    return run_tool("tools/train.py", "configs/quickstart.py", *TINY, f"train.run_dir={run_dir}", *overrides,
                    fault=fault)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline")
    done = train_tool(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-0000002.pt", "step-0000004.pt"]
    return run_dir


def copy_run(baseline, tmp_path):
    return shutil.copytree(baseline, tmp_path / "run")


def lrs(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_corrupt_newest_is_named_and_resume_takes_the_newest_good_one_with_the_lr_given_now(baseline, tmp_path):
    run_dir = copy_run(baseline, tmp_path)
    newest = run_dir / "checkpoints" / "step-0000004.pt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0x5A for b in data[middle:middle + 4096])  # same size, flipped bytes
    newest.write_bytes(bytes(data))
    # only the run dir and the overrides that change things: the rest comes from the run's config.json
    done = run_tool("tools/train.py", "configs/quickstart.py", "--resume", f"train.run_dir={run_dir}",
                    "train.steps=6", "optim.schedule=cosine", "optim.lr=2e-4", "optim.min_lr=1e-4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step-0000004.pt in" in done.stdout and "are corrupt: resuming from step-0000002.pt" in done.stdout
    assert "resuming from step 2" in done.stdout
    assert list(losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    for step, lr in lrs(run_dir).items():  # after `step` optimizer steps; cosine over 6 steps, no warm-up
        if step > 2:
            assert lr == pytest.approx(1e-4 + (2e-4 - 1e-4) * 0.5 * (1 + math.cos(math.pi * step / 6))), step
    assert load_checkpoint(run_dir / "checkpoints" / "step-0000006.pt")["step"] == 6


def test_sampling_from_a_random_bytes_checkpoint_names_it_in_one_line(baseline, tmp_path):
    run_dir = copy_run(baseline, tmp_path)
    newest = run_dir / "checkpoints" / "step-0000004.pt"
    newest.write_bytes(torch.randint(0, 256, (newest.stat().st_size,), dtype=torch.uint8).numpy().tobytes())
    done = run_tool("tools/sample.py", run_dir, "--classes", "0", "--per-class", "1", "--out", tmp_path / "g.png")
    assert_fails_in_one_line(done, 1, f"checkpoint {newest} is corrupt or not a checkpoint",
                             "use an earlier one, e.g.", "step-0000002.pt")
    assert "weights_only" not in done.stderr and not (tmp_path / "g.png").exists()


def test_diverged_weights_are_never_checkpointed(tmp_path):
    done = train_tool(tmp_path, fault="ema-diverges-at-step-3")
    good = tmp_path / "checkpoints" / "step-0000002.pt"
    assert_fails_in_one_line(done, 1, "not writing step-0000004.pt: the ema weights are not finite",
                             f"the newest good checkpoint is {good}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002.pt"]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(good)["ema"].values())


def test_pruning_keeps_the_newest_checkpoint_whatever_keep_last_says(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step}, tmp_path / f"step-000000{step}.pt")
    prune_checkpoints(tmp_path, keep_last=0)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000003.pt"]


def test_failed_resume_with_another_model_leaves_the_run_as_it_was(baseline, tmp_path):
    run_dir = copy_run(baseline, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    wider = "model.kwargs={'hidden_size': 48, 'depth': 3, 'num_heads': 2, 'patch_size': 4}"
    done = train_tool(run_dir, wider, "train.steps=6", "--resume")
    assert_fails_in_one_line(done, 1, "does not match the model", "shape mismatches", lines=5)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # config.json included


def test_a_second_run_on_a_locked_run_dir_fails_and_a_stale_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = train_tool(tmp_path, "train.steps=2")
        assert_fails_in_one_line(done, 1, f"run dir {tmp_path} is in use by PID {holder.pid} on",
                                 "choose another train.run_dir")
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    done = train_tool(tmp_path, "train.steps=2", "--resume")  # the killed holder left its PID in the lock
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"taking over the stale lock of PID {holder.pid}" in done.stdout
    assert f"--resume: no checkpoint in {tmp_path / 'checkpoints'}; starting fresh from step 0" in done.stdout
    assert list(losses(tmp_path)) == [1, 2]


def test_evaluation_and_sample_grids_leave_the_training_losses_unchanged(baseline, tmp_path):
    done = train_tool(tmp_path, "eval.num_samples=20", "eval.every=2", "log.grid_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "grids" / "step-0000001.png").is_file() and (tmp_path / "eval.json").is_file()
    assert losses(tmp_path) == losses(baseline)  # the same floats, not approximately


def test_resuming_a_run_from_before_a_key_existed_gives_that_key_its_default(tmp_path):
    from ssm_tread.train.config import load_config, resume_config, save_config

    cfg = load_config("configs/quickstart.py", [f"train.run_dir={tmp_path}", "optim.lr=3e-3"])
    del cfg["data"]["verify"]  # a run started before data.verify
    save_config(cfg, tmp_path / "config.json")
    notes = []
    resumed = resume_config("configs/quickstart.py", [f"train.run_dir={tmp_path}", "train.steps=9"], notes.append)
    assert resumed["data"]["verify"] == "sample" and resumed["optim"]["lr"] == 3e-3
    assert resumed["train"]["steps"] == 9 and resumed["train"]["resume"] == "auto"
    assert notes == [f"resuming with the run's config {tmp_path / 'config.json'} plus the overrides given now; "
                     f"quickstart.py differs in optim.lr (ignored: give them as overrides to change them)"]
