"""The trainer: outputs, resume, crash-safe checkpoints, signals, errors, and 2-process DDP on gloo."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from ssm_tread import checkpoint as ckpt
from ssm_tread.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ssm_tread.train.config import ConfigError, load_config
from ssm_tread.train.distributed import cpu_threads_per_rank
from ssm_tread.train.trainer import GlobalBatches, TrainingError, train

TINY = ["model.name=DiT", "model.kwargs={'hidden_size': 32, 'depth': 3, 'num_heads': 2, 'patch_size': 4}",
        "routing.routes=[(1, 1, 0.5)]", "train.batch_size=8", "train.steps=4", "train.ckpt_every=2",
        "train.keep_last=5", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
        "log.every=1", "log.tensorboard=false", "log.progress=false", "eval.num_samples=0",
        "sample.steps=2", "sample.grid_classes=[0, 1]", "sample.grid_per_class=2",
        "train.cpu_threads=1"]  # one thread a process: tests start several processes on a 2-core machine


@pytest.mark.parametrize("cores, ranks, wanted, threads", [(2, 1, 2, 2), (2, 2, 2, 1), (16, 4, 8, 4), (1, 1, 2, 1),
                                                           (8, 1, 3, 3), (2, 4, 2, 1)])
def test_cpu_threads_never_exceed_the_cores_of_a_rank(monkeypatch, cores, ranks, wanted, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert cpu_threads_per_rank(wanted) == threads


def tiny(run_dir, *overrides):
    return load_config("configs/quickstart.py", [*TINY, f"train.run_dir={run_dir}", *overrides])


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def params(path):
    return load_checkpoint(path)["model"]


def test_run_writes_its_outputs(tmp_path):
    summary = train(tiny(tmp_path, "optim.lr=3e-4"))
    assert summary["step"] == 4 and summary["checkpoint"] == tmp_path / "checkpoints" / "step-0000004.pt"
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["optim"]["lr"] == 3e-4 and saved["train"]["run_dir"] == str(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "images_per_s", "tflops_per_device", "memory_gb", "grad_norm"} <= set(rows[0])
    state = load_checkpoint(summary["checkpoint"])
    assert state["step"] == 4 and set(state["ema"]) == set(state["model"]) and len(state["rng"]) == 1


def test_digits_eval_writes_metrics_and_the_grid(tmp_path):
    summary = train(tiny(tmp_path, "train.steps=1", "eval.num_samples=40", "sample.grid_per_class=3",
                         "sample.grid_classes=[0, 5, 9]"))
    assert set(summary["eval"]) == {"fid", "accuracy"}
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 1
    assert (tmp_path / "samples.png").is_file()
    with pytest.raises(ConfigError, match="grid_per_class"):
        train(tiny(tmp_path / "small", "eval.num_samples=20", "sample.grid_per_class=3"))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny(full, "train.steps=6", "train.ckpt_every=3"))
    train(tiny(split, "train.steps=3", "train.ckpt_every=3"))
    train(tiny(split, "train.steps=6", "train.ckpt_every=3", "train.resume=auto"))
    a, b = losses(full), losses(split)
    assert list(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    for key, value in params(full / "checkpoints").items():
        torch.testing.assert_close(params(split / "checkpoints")[key], value, rtol=1e-5, atol=1e-6)


def test_a_fresh_run_does_not_clobber_checkpoints(tmp_path):
    train(tiny(tmp_path, "train.steps=2"))
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny(tmp_path, "train.steps=2"))
    train(tiny(tmp_path, "train.steps=2"), overwrite=True)


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "step-0000001.pt")

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path / "step-0000002.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_crash_during_a_run_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def flaky(obj, f):
        calls.append(obj["step"])
        if len(calls) == 2:
            f.write(b"torn")
            raise OSError("killed mid-write")
        real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", flaky)
    with pytest.raises(OSError, match="killed mid-write"):
        train(tiny(tmp_path))
    newest = latest_checkpoint(tmp_path / "checkpoints")
    assert load_checkpoint(newest)["step"] == 2


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
    from ssm_tread.train.ema import EMA
    real_update, count = EMA.update, []

    def update(self, model):
        real_update(self, model)
        count.append(1)
        if len(count) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(EMA, "update", update)
    summary = train(tiny(tmp_path, "train.steps=10", "train.ckpt_every=0"))
    assert summary["stopped"] and summary["step"] == 4  # the step in flight when the signal came completes
    assert load_checkpoint(summary["checkpoint"])["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_non_finite_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path, monkeypatch):
    from ssm_tread.diffusion.flow import FlowMatching
    real, count = FlowMatching.training_losses, []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count.append(1)
        if len(count) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(FlowMatching, "training_losses", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3; last good checkpoint: .*step-0000002.pt"):
        train(tiny(tmp_path))


def test_checkpoint_of_another_model_names_the_mismatching_keys(tmp_path):
    train(tiny(tmp_path, "train.steps=1"))
    wider = "model.kwargs={'hidden_size': 48, 'depth': 3, 'num_heads': 2, 'patch_size': 4}"
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*checkpoint \[.*\] vs model \[.*\]"):
        train(tiny(tmp_path, wider, "train.steps=2", "train.resume=auto"))


def test_missing_data_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.root='/no/such/latents': does not exist"):
        train(tiny(tmp_path, "data.name=latents", "data.root=/no/such/latents"))


def test_guidance_without_label_dropout_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        train(tiny(tmp_path, "model.class_dropout_prob=0.0", "sample.cfg_scale=2.0"))


def test_batch_must_split_over_ranks_and_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        train(tiny(tmp_path, "train.batch_size=9", "train.grad_accum=2"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    no_dropout = ["model.class_dropout_prob=0.0", "sample.cfg_scale=1.0", "routing.routes=[]"]
    train(tiny(tmp_path / "one", *no_dropout, "train.steps=2"))
    train(tiny(tmp_path / "acc", *no_dropout, "train.steps=2", "train.grad_accum=4"))
    for key, value in params(tmp_path / "one" / "checkpoints").items():
        torch.testing.assert_close(params(tmp_path / "acc" / "checkpoints")[key], value, rtol=1e-4, atol=1e-6)


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = GlobalBatches(20, 8, 8, 0, 1, seed=3, start_step=0)
    two = [GlobalBatches(20, 8, 4, r, 2, seed=3, start_step=0) for r in range(2)]
    ones, twos = iter(one), [iter(s) for s in two]
    for _ in range(6):
        assert next(ones) == next(twos[0]) + next(twos[1])
    later = iter(GlobalBatches(20, 8, 8, 0, 1, seed=3, start_step=4))
    assert next(later) == one.global_indices(4).tolist()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(run_dir, *overrides, timeout=240):
    """tools/train.py on the TINY config under torchrun: 2 gloo processes of one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "tools/train.py", "configs/quickstart.py", *TINY, f"train.run_dir={run_dir}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path):
    same = ["model.class_dropout_prob=0.0", "sample.cfg_scale=1.0", "routing.routes=[]", "train.steps=3",
            "train.ckpt_every=0"]
    train(tiny(tmp_path / "one", *same))
    torchrun_train(tmp_path / "two", *same)
    state = load_checkpoint(tmp_path / "two" / "checkpoints")
    assert len(state["rng"]) == 2
    for key, value in params(tmp_path / "one" / "checkpoints").items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-4, atol=1e-6)


def test_cli_reports_a_bad_key_without_a_traceback():
    done = subprocess.run([sys.executable, "tools/train.py", "configs/quickstart.py", "train.step=3"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2
    assert "error: unknown config key 'train.step'; did you mean 'train.steps'?" in done.stderr
    assert "Traceback" not in done.stderr


def test_weight_decay_skips_biases_norms_and_ssm_parameters():
    from ssm_tread.models import create_model
    from ssm_tread.train.step import parameter_groups

    model = create_model("ZigMa", input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2,
                         num_classes=3, learn_sigma=False, d_state=4, pos_embed="sincos")
    decay, no_decay = parameter_groups(model, 0.03)
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.1.norm.weight", "blocks.0.mixer.dt_proj.bias"} <= skipped
    assert {"blocks.0.mixer.in_proj.weight", "blocks.0.mixer.x_proj.weight", "blocks.1.mixer.out_proj.weight"} <= decayed
    assert "pos_embed" not in decayed | skipped  # fixed, not trained


def test_config_key_forces_the_scan_backend():
    from ssm_tread.ops import active_backend, set_backend
    from ssm_tread.train.config import ConfigError
    from ssm_tread.train.trainer import select_scan_backend

    try:
        select_scan_backend("reference")
        assert active_backend("cpu") == "reference"
        select_scan_backend(None)
        assert active_backend("cpu") == "torch"
        with pytest.raises(ConfigError, match="model.scan_backend.*torch"):
            select_scan_backend("cuda_fast")
    finally:
        set_backend(None)
