"""tools/gpu_run.py and tools/gpu_wheels.py: the study's trainer runs without scipy (absent on the GPU
machine), the GPU run keeps its results inside its time budget (a step past its limit is stopped with
every process it started; the run folders are archived without checkpoints), and the wheel list keeps
what the requested packages need and leaves out what only torch needs."""

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from tools import gpu_run
from tools.gpu_wheels import needed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a sitecustomize that makes packages absent in a process and every process it starts: the path finder no
# longer finds them, so importing them raises and importlib.util.find_spec returns None
HIDE = ("import importlib.machinery as m\nfind = m.PathFinder.find_spec\nhidden = {hidden!r}\n"
        "m.PathFinder.find_spec = classmethod(lambda cls, name, *a: None if name.split('.')[0] in hidden "
        "else find(name, *a))\n")


def env_without(tmp_path, *packages):
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE.format(hidden=set(packages)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT])}


def test_hidden_packages_are_absent(tmp_path):
    code = ("import importlib.util, sys; print(importlib.util.find_spec('json') is not None, "
            "importlib.util.find_spec('scipy') is not None)\nimport scipy")
    done = subprocess.run([sys.executable, "-c", code], env=env_without(tmp_path, "scipy"), capture_output=True,
                          text=True, check=False)
    assert done.stdout.split() == ["True", "False"] and "No module named 'scipy'" in done.stderr


def test_the_evaluation_metrics_need_no_scipy(tmp_path):
    code = ("import numpy as np; from ssm_tread.eval.metrics import inception_score; "
            "logits = np.zeros((16, 4)); logits[np.arange(16), np.arange(16) % 4] = 50; "
            "print(inception_score(logits, splits=2))")
    done = subprocess.run([sys.executable, "-c", code], env=env_without(tmp_path, "scipy"), capture_output=True,
                          text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(4.0)  # 4 classes used equally and predicted with certainty


def test_dry_run_trains_evaluates_and_archives_a_run_without_scipy(tmp_path):
    """The script's study step at toy size, scipy absent in every process (the trainer's runs included):
    one run trains, is evaluated, and comes back in OUT's report and archive, without its checkpoint."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, "tools/gpu_run.py", str(out), "--dry-run", "--parts", "study", "--backbones", "DiT",
           "--modes", "scan", "--workers", "1", "--runs", str(runs)]
    done = subprocess.run(cmd, env=env_without(tmp_path, "scipy"), capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "nothing installed" in done.stdout and "exit code 0" in done.stdout
    data = json.loads((out / "study.json").read_text())
    assert list(data["runs"]) == ["DiT|scan|0"] and data["config"]["dry_run"]
    assert "Convergence study study_mnist (dry run" in (out / "study.md").read_text()
    with tarfile.open(out / "study_runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"runs/DiT-scan-seed0/eval.json", "runs/DiT-scan-seed0/metrics.jsonl", "runs/report/study.json"} <= names
    assert list((runs / "DiT-scan-seed0" / "checkpoints").glob("*.pt"))  # written, and left out of the archive
    assert not [n for n in names if "checkpoints" in n or n.endswith(".lock")]
    assert (out / "gpu_run.log").read_text().count("] $ ") == 1  # one study command: the dry run has one seed
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.log", "study.json", "study.md", "study_runs.tar.gz"]


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    session = gpu_run.Session(tmp_path, budget_s=60)
    late = tmp_path / "late"
    start = time.monotonic()
    code, seconds = session.run(["sh", "-c", f"echo started; (sleep 3; touch {late}) & wait"], 1, dict(os.environ))
    assert code is None and 1 <= seconds < 3 and time.monotonic() - start < 3
    time.sleep(3)
    assert not late.exists()  # the grandchild was stopped with the step
    log = (tmp_path / "gpu_run.log").read_text()
    assert "started" in log and "stopped at its limit" in log
    assert session.run(["sh", "-c", "exit 3"], 10, dict(os.environ))[0] == 3


def test_pack_runs_replaces_the_archive_whole_and_leaves_checkpoints_out(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a" / "checkpoints").mkdir(parents=True)
    (runs / "a" / "checkpoints" / "step-1.pt").write_bytes(b"x" * 1000)
    (runs / "a" / "eval.json").write_text("{}")
    (runs / "a" / ".lock").write_text("")
    archive = tmp_path / "runs.tar.gz"
    archive.write_text("an older archive")
    assert gpu_run.pack_runs(runs, archive) == archive.stat().st_size
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["runs", "runs/a", "runs/a/eval.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "runs.tar.gz"]


def test_missing_modules(tmp_path):
    env = env_without(tmp_path, "json")
    assert gpu_run.missing_modules(sys.executable, ["json", "os", "no_such_module_here"], env) == [
        "json", "no_such_module_here"]


def item(name, version, requires=(), requested=False):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}, "requested": requested}


def test_wheel_list_follows_the_requested_packages_only():
    report = {"environment": {"python_version": "3.12", "sys_platform": "linux", "platform_machine": "x86_64"},
              "install": [
                  item("accelerate", "1.0", ["numpy", "psutil", "PyYAML", "torch>=2", "rich; extra == 'rich'"],
                       requested=True),
                  item("Pillow", "11.0", requested=True),
                  item("psutil", "7.0", ["pywin32; sys_platform == 'win32'"]),
                  item("pyyaml", "6.0"),
                  item("rich", "13.0"),  # only an extra of accelerate's asks for it
                  item("pywin32", "300"),  # only on Windows
                  item("nvidia-cublas", "13.0"),  # only torch (installed, so not in the list) needs it
              ]}
    assert needed(report) == {"accelerate": "1.0", "pillow": "11.0", "psutil": "7.0", "pyyaml": "6.0"}
