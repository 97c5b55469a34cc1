"""Training on several nodes: two torchrun agents of one gloo process each (two "nodes") meet through a c10d
rendezvous on 127.0.0.1 and train as one node of two ranks would; a node that dies stops the run with its
last good checkpoint kept, and the run resumes on another number of nodes; ranks that disagree are refused;
tools/slurm/train.sbatch runs under stand-ins for srun and scontrol.

Run as a script, this file is the training tool with the micro-batches of GlobalBatches recorded:
``python tests/test_multinode.py tools/train.py ARGS`` appends each micro-batch's sample indices to
``$RECORD_BATCHES/rank-<RANK>.jsonl``.
"""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from test_reliability_io import LATENT, latents  # noqa: F401 (a fixture)
from test_train import TINY, _free_port, losses, params, tiny

from ssm_tread.checkpoint import list_checkpoints, load_checkpoint, load_newest_good
from ssm_tread.machine import loader_workers
from ssm_tread.train import distributed, trainer
from ssm_tread.train.config import ConfigError
from ssm_tread.train.distributed import LostRanks, RanksDisagree, lost_ranks_stop_in_one_line
from ssm_tread.train.runlock import RunDirError, RunLock
from ssm_tread.train.trainer import TrainingError, train
from ssm_tread.train.validate import validate_config

# no per-rank random streams (routing selections, label dropout; the latents' flips and posterior samples are
# turned off where latents are read): every number of ranks trains the same model
SAME = ["model.class_dropout_prob=0.0", "sample.cfg_scale=1.0", "routing.routes=[]"]


def record_batches(folder, name=None):
    """GlobalBatches appends the indices of each micro-batch it yields to ``folder``/rank-<name or RANK>.jsonl."""
    iterate = trainer.GlobalBatches.__iter__

    def recorded(self):
        path = Path(folder) / f"rank-{name or os.environ.get('RANK', '0')}.jsonl"
        for indices in iterate(self):
            with open(path, "a") as f:
                f.write(json.dumps(indices) + "\n")
            yield indices

    trainer.GlobalBatches.__iter__ = recorded


def recorded(folder, rank, steps):
    return [json.loads(line) for line in (Path(folder) / f"rank-{rank}.jsonl").read_text().splitlines()[:steps]]


def start_nodes(tmp_path, config, *overrides, node_overrides=((), ()), args=(), record=None):
    """tools/train.py on len(node_overrides) torchrun agents ("nodes") of one process each, meeting through a c10d
    rendezvous on 127.0.0.1; node i adds node_overrides[i]. Returns the agents' Popen objects (logs in
    tmp_path/node-<i>.log)."""
    port, nodes = _free_port(), len(node_overrides)
    script = ["tests/test_multinode.py", "tools/train.py"] if record else ["tools/train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"RECORD_BATCHES": str(record)} if record else {})}
    agents = []
    for i, extra in enumerate(node_overrides):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", "--max-restarts=0",
                   *script, str(config), *TINY, *overrides, *extra, *args]
        with open(tmp_path / f"node-{i}.log", "w") as out:
            agents.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))
    return agents


def workers(agent):
    """The PIDs of an agent's workers (torchrun starts them in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == agent.pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def kill_node(agent):
    """SIGKILL a node: its workers and its agent."""
    for pid in workers(agent):
        os.kill(pid, signal.SIGKILL)
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()


def kill_the_rest(agents):
    for agent in agents:
        if agent.poll() is None:
            kill_node(agent)


def finish(agents, timeout=240):
    """The agents' exit codes; any still running after ``timeout`` seconds is killed and fails the test."""
    try:
        return [agent.wait(timeout=timeout) for agent in agents]
    finally:
        kill_the_rest(agents)


def log(tmp_path, i):
    return (tmp_path / f"node-{i}.log").read_text()


def test_two_nodes_train_and_evaluate_as_one_node(tmp_path, monkeypatch):
    """The global batch, the data order, the losses, the checkpoints and the final evaluation of 2 nodes x 1
    process equal those of one process with the same global batch; each rank takes its slice of every
    step's batch; the loader workers are sized to the ranks of a node, not of the run."""
    run = [*SAME, "train.steps=4", "train.ckpt_every=2", "eval.num_samples=20", "sample.batch_size=5"]
    (tmp_path / "workers.py").write_text("from quickstart import *\ndata['num_workers'] = None\n")
    agents = start_nodes(tmp_path, tmp_path / "workers.py", *run, f"train.run_dir={tmp_path / 'two'}",
                         record=tmp_path)
    monkeypatch.setattr(trainer.GlobalBatches, "__iter__", trainer.GlobalBatches.__iter__)  # undone after the test
    record_batches(tmp_path, "one")  # the one-process reference, trained while the nodes run
    train(tiny(tmp_path / "one", *run))
    assert finish(agents) == [0, 0], log(tmp_path, 0)[-3000:] + log(tmp_path, 1)[-3000:]

    banner = next(line for i in (0, 1) for line in log(tmp_path, i).splitlines() if "rank(s) on cpu" in line)
    assert "2 rank(s)" in banner and f"{loader_workers(1)} loader worker(s)" in banner, banner
    one = recorded(tmp_path, "one", 4)
    ranks = [recorded(tmp_path, r, 4) for r in (0, 1)]
    for step in range(4):
        assert ranks[0][step] == one[step][:4] and ranks[1][step] == one[step][4:], step

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert [step for step, _ in list_checkpoints(tmp_path / "two" / "checkpoints")] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-0000002.pt",
                                                                                  "step-0000004.pt"]
    state = load_checkpoint(tmp_path / "two" / "checkpoints")
    assert len(state["rng"]) == 2
    for key, value in params(tmp_path / "one" / "checkpoints").items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-4, atol=1e-6)
    one_eval, two_eval = (json.loads((tmp_path / run_dir / "eval.json").read_text()) for run_dir in ("one", "two"))
    assert two_eval["step"] == 4 and two_eval["accuracy"] == one_eval["accuracy"]
    assert two_eval["fid"] == pytest.approx(one_eval["fid"], rel=1e-4)
    assert (tmp_path / "two" / "samples.png").is_file() and (tmp_path / "two" / "loss.png").is_file()
    assert (tmp_path / "two" / ".lock").read_text() == ""  # released; one holder for the run


def rank_0_node(run_dir, agents):
    """The index of the agent whose worker holds the run dir's lock: the node of global rank 0."""
    pid = int((run_dir / ".lock").read_text().split()[1])
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return [agent.pid for agent in agents].index(parent)


def wait_for_step(run_dir, step, agents, tmp_path):
    """Until the run dir holds a checkpoint of ``step`` or later: train.keep_last deletes step's own a few steps
    on, which at tens of steps a second can fall between two looks."""
    started = time.monotonic()
    while not any(done >= step for done, _ in list_checkpoints(run_dir / "checkpoints")):
        assert all(agent.poll() is None for agent in agents), log(tmp_path, 0)[-3000:] + log(tmp_path, 1)[-3000:]
        assert time.monotonic() - started < 180, f"no checkpoint of step {step} or later"
        time.sleep(0.1)


def test_a_dead_node_stops_the_run_which_resumes_on_one_node(latents, tmp_path, capsys):  # noqa: F811
    """Killing the node of global rank 0 (its agent and its worker, as when a node dies) ends the other node
    within seconds; the newest complete checkpoint survives, and a resume on one node continues the run as
    an uninterrupted one-process run. Each node reads its own copy of the latents (data.root differs)."""
    roots = [latents, shutil.copytree(latents, tmp_path / "node-1-scratch")]
    run_dir = tmp_path / "run"
    run = [*LATENT, *SAME, "data.kwargs={'flip': False, 'sample': False}", "train.ckpt_every=2", "train.keep_last=2"]
    agents = start_nodes(tmp_path, "configs/quickstart.py", *run, "train.steps=100000", f"train.run_dir={run_dir}",
                         node_overrides=[[f"data.root={root}"] for root in roots], args=["--timeout", "60"])
    try:
        wait_for_step(run_dir, 4, agents, tmp_path)
        with pytest.raises(RunDirError, match="is in use by PID"):  # one lock, held by global rank 0
            RunLock(run_dir).__enter__()
        node = rank_0_node(run_dir, agents)
        kill_node(agents[node])
        killed = time.monotonic()
        assert agents[1 - node].wait(timeout=60) != 0
        assert time.monotonic() - killed < 60
    finally:
        kill_the_rest(agents)
    said_lost_ranks(log(tmp_path, 1 - node), rank=1 - node)
    assert json.loads((run_dir / "config.json").read_text())["data"]["root"] == str(roots[node])

    newest = load_newest_good(run_dir / "checkpoints")["step"]
    assert newest >= 4
    again = [*run, f"data.root={roots[1]}", "train.resume=auto"]
    with pytest.raises(TrainingError, match="train.batch_size=16 differs from the 8 of checkpoint"):
        train(tiny(run_dir, *again, "train.batch_size=16"))
    resumed = train(tiny(run_dir, *again, f"train.steps={newest + 2}"))
    note = "resuming on 1 ranks from a checkpoint of 2: the data order, noise and diffusion times continue"
    assert note in capsys.readouterr().out
    assert all(path.name.startswith("step-") for path in (run_dir / "checkpoints").iterdir())  # no torn write left
    reference = train(tiny(tmp_path / "one", *run, f"data.root={roots[0]}", f"train.steps={newest + 2}"))
    a, b = losses(tmp_path / "one"), losses(run_dir)
    for step in (newest + 1, newest + 2):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    for key, value in params(reference["checkpoint"]).items():
        torch.testing.assert_close(params(resumed["checkpoint"])[key], value, rtol=1e-4, atol=1e-6)


def said_lost_ranks(node_log: str, rank: int):
    """The surviving worker printed one error line naming the checkpoint to resume from, not torch's traceback
    (the torchrun agent's own report of a failed worker follows it)."""
    worker = [line for line in node_log.splitlines() if line.startswith(f"[rank{rank}]") or line.startswith("error:")]
    assert len(worker) == 1, node_log[-3000:]
    where = f"rank {rank}: " if rank else ""  # rank 0 prints for the whole run
    assert worker[0].startswith(f"error: {where}lost the other ranks at step "), worker[0]
    assert "the run dir keeps step-" in worker[0] and worker[0].endswith("continue with --resume"), worker[0]


class FakeRun:
    def __init__(self, world, last_ckpt):
        self.accelerator = type("Accelerator", (), {"num_processes": world, "process_index": 1})()
        self.step, self.last_ckpt = 7, last_ckpt


def test_a_collective_that_fails_for_a_lost_rank_becomes_one_line_naming_the_checkpoint():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:3731. This is typically caused by a remote worker crashing.\nmore")
    with pytest.raises(LostRanks) as raised, lost_ranks_stop_in_one_line(FakeRun(2, Path("ck/step-0000006.pt"))):
        raise gloo
    assert str(raised.value) == (
        "lost the other ranks at step 7 (Connection closed by peer [127.0.0.1]:3731): a node died, hung past "
        "--timeout or was cut off, its own log says why; the run dir keeps step-0000006.pt: continue with --resume")
    assert raised.value.node_local and raised.value.__cause__ is gloo
    with pytest.raises(LostRanks, match="no checkpoint was written yet"), lost_ranks_stop_in_one_line(FakeRun(2, None)):
        raise torch.distributed.DistBackendError("NCCL communicator was aborted on rank 0.")
    for world, error in [(2, RuntimeError("mat1 and mat2 shapes cannot be multiplied")), (1, gloo)]:
        with pytest.raises(RuntimeError) as raised, lost_ranks_stop_in_one_line(FakeRun(world, None)):
            raise error
        assert raised.value is error  # a bug, or one process: unchanged


class Data(list):
    num_classes = 10


def test_ranks_that_disagree_are_refused_but_data_root_may_differ(monkeypatch, tmp_path):
    """What each node's command line and file system give its ranks must agree with rank 0, except data.root."""
    cfg = tiny(tmp_path, "data.root=/scratch/node-0/latents")
    state = {"path": str(tmp_path / "step-0000004.pt"), "checksum": "abc"}

    def check(other_cfg, other_state=state, other_size=100):
        """Rank 0 with (cfg, state, 100 images) against a rank 1 with these."""
        other_data = Data(range(other_size))
        views = []
        monkeypatch.setattr(distributed, "gather_objects", lambda obj, world: views.append(obj) or [obj, obj])
        distributed.check_ranks_agree(other_cfg, other_state, other_data, 2)  # what rank 1 sends
        monkeypatch.setattr(distributed, "gather_objects", lambda obj, world: [obj, views[0]])
        distributed.check_ranks_agree(cfg, state, Data(range(100)), 2)

    check(tiny(tmp_path, "data.root=/scratch/node-1/latents"))
    with pytest.raises(RanksDisagree, match=r"^rank 1 on .* has another config than rank 0 on .* \(differs in "
                                            r"optim.lr\): give every node the same command line"):
        check(tiny(tmp_path, "optim.lr=2e-3"))
    with pytest.raises(RanksDisagree, match=r"resumes from step-0000002.pt \(sha256 def\), rank 0 on .* from "
                                            r"step-0000004.pt \(sha256 abc\): the nodes see different files"):
        check(cfg, {"path": str(tmp_path / "step-0000002.pt"), "checksum": "def"})
    with pytest.raises(RanksDisagree, match="reads 90 images of 10 classes from data.root, rank 0 on .* 100 images"):
        check(cfg, other_size=90)


def test_ranks_that_do_not_divide_the_global_batch_are_refused(tmp_path):
    """3 ranks cannot share the global batch of 8 the same way (nor resume a run of it): one line says so."""
    with pytest.raises(ConfigError, match=r"^train.batch_size=8: is not divisible by 3 rank\(s\) x "
                                          r"train.grad_accum=1; .*a resumed run keeps its global batch: change "
                                          r"train.grad_accum or the number of ranks\)$"):
        validate_config(tiny(tmp_path), world=3)


def test_a_node_local_data_root_problem_is_printed_on_every_node(tmp_path, capsys, monkeypatch):
    """Each node checks its own data.root; the first rank of a node that lacks its copy says so (rank 0 may not)."""
    from tools.cli import run_tool as run_main

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # run_tool's exit handler stays out of pytest
    cfg = tiny(tmp_path, *LATENT, "data.root=/no/such/scratch/latents")
    for rank, local_rank, printed in (("1", "0", 1), ("3", "1", 0)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as exit_:
            run_main(lambda: validate_config(cfg, world=4))
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count(f"error: rank {rank}: data.root='/no/such/scratch/latents': does not exist") == printed, err


def test_a_run_dir_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch):
    """A shared file system without locks (Lustre without -o flock: ENOSYS) does not stop a run."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said = []
    with RunLock(tmp_path, say=said.append):
        pass
    assert said == [(f"warning: the file system of run dir {tmp_path} has no locks (Function not implemented): "
                     f"nothing stops a second run from using it at the same time")]


@pytest.mark.slow
def test_a_hung_node_fails_the_run_after_the_timeout(tmp_path):
    """A node that stops answering but keeps its connections open (frozen, or cut off) is noticed by the
    collective timeout (--timeout): the other node fails after it instead of waiting for torch's 30 minutes."""
    run_dir = tmp_path / "run"
    agents = start_nodes(tmp_path, "configs/quickstart.py", *SAME, "train.steps=100000", "train.ckpt_every=2",
                         "train.keep_last=2", f"train.run_dir={run_dir}", args=["--timeout", "10"])
    try:
        wait_for_step(run_dir, 4, agents, tmp_path)
        node = 1 - rank_0_node(run_dir, agents)
        for pid in workers(agents[node]):
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert agents[1 - node].wait(timeout=120) != 0
        assert time.monotonic() - stopped < 40
    finally:
        kill_the_rest(agents)
    said_lost_ranks(log(tmp_path, 1 - node), rank=1 - node)
    assert load_newest_good(run_dir / "checkpoints")["step"] >= 4


FAKE_SRUN = """#!/bin/bash
# srun's options, then the command: run it once per node, all at once; fail if any fails
while [[ "$1" == --* ]]; do shift; done
pids=(); for node in $(seq "$SLURM_JOB_NUM_NODES"); do "$@" & pids+=($!); done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done; exit $status
"""


def slurm_stand_ins(folder, srun):
    """``folder``/srun (the script ``srun``) and ``folder``/scontrol (every host is 127.0.0.1), for PATH."""
    folder.mkdir()
    for name, text in (("srun", srun), ("scontrol", "#!/bin/bash\necho 127.0.0.1\n")):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)


@pytest.mark.slow
def test_the_slurm_script_trains_on_two_nodes(latents, tmp_path):  # noqa: F811
    """tools/slurm/train.sbatch under a stand-in for srun (each task on this machine) and scontrol."""
    slurm_stand_ins(tmp_path / "bin", FAKE_SRUN)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7",
           "RDZV_PORT": str(_free_port()), "NPROC_PER_NODE": "1", "LATENTS": str(latents),
           "LOCAL_LATENTS": str(tmp_path / "scratch"), "TIMEOUT": "60"}
    done = subprocess.run(["bash", "tools/slurm/train.sbatch", "configs/quickstart.py", *TINY, *LATENT,
                           f"train.run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rank(s) on cpu" in done.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["root"] == str(tmp_path / "scratch")
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2, 4]


# srun's options, then the command: the copy $COPIES times at once, as jobs that share a node (or nodes that share
# LOCAL_LATENTS) would run it; the training command is written to $TRAIN_COMMAND instead of run
COPY_ONLY_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
if [[ "$1" == python ]]; then printf '%s\\n' "$@" > "$TRAIN_COMMAND"; exit 0; fi
pids=(); for copy in $(seq "$COPIES"); do "$@" & pids+=($!); done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done; exit $status
"""


def test_latent_copies_that_share_a_folder_leave_every_file_whole(tmp_path):
    """Eight copies into one LOCAL_LATENTS at once, ten times over: each ends with every file byte for byte and
    no copy left behind. (cp -r into the shared folder itself failed with 'File exists' in 7 of 10 such rounds.)"""
    source = tmp_path / "latents"
    source.mkdir()
    files = {f"shard_{i:05d}.labels.npy": os.urandom(64 + i) for i in range(200)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    slurm_stand_ins(tmp_path / "bin", COPY_ONLY_SRUN)
    scratch = tmp_path / "scratch"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7", "LATENTS": str(source), "LOCAL_LATENTS": str(scratch),
           "COPIES": "8", "TRAIN_COMMAND": str(tmp_path / "train_command")}
    for _ in range(10):
        shutil.rmtree(scratch, ignore_errors=True)
        done = subprocess.run(["bash", "tools/slurm/train.sbatch", "configs/quickstart.py"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert {path.name: path.read_bytes() for path in scratch.iterdir()} == files
    assert f"data.root={scratch}" in (tmp_path / "train_command").read_text().splitlines()


if __name__ == "__main__":  # the training tool, recording its batches
    record_batches(os.environ["RECORD_BATCHES"])
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
