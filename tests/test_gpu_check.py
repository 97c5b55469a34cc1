"""tools/gpu_check.py: every part runs on CPU at toy sizes in its dry run (with tqdm absent, as on the GPU
machine, which has only torch, triton and einops), its time budgets cut a part and keep the report, a
device left unusable by a failing part skips the rest, and the numbers it reports follow from their
definitions."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from tools import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("environment", "matmul_peak", "scan_parity", "scan_speed", "training", "sampling", "torch_compile")
# tqdm made absent as on the GPU machine: the path finder no longer finds it, so importlib.util.find_spec
# returns None (torch._dynamo runs find_spec over a skip list naming tqdm) and importing it raises
WITHOUT_TQDM = (
    "import importlib.machinery as m, runpy, sys; find = m.PathFinder.find_spec; "
    "m.PathFinder.find_spec = classmethod(lambda cls, name, *a: None if name.split('.')[0] == 'tqdm' "
    "else find(name, *a)); sys.argv = ['tools/gpu_check.py'] + sys.argv[1:]; "
    "runpy.run_path('tools/gpu_check.py', run_name='__main__')"
)


def run_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the dry run switches it on
    cmd = [sys.executable, "-c", WITHOUT_TQDM, "--dry-run", "--out", str(tmp_path), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((tmp_path / "gpu_check.json").read_text())


def test_gpu_check_dry_run_runs_every_part_without_tqdm(tmp_path):
    result, report = run_check(tmp_path)
    assert (tmp_path / "gpu_check.md").read_text() in result.stdout
    failed = {name: part.get("reason") for name, part in report["parts"].items() if part["status"] != "ok"}
    assert tuple(report["parts"]) == PARTS and not failed, failed

    parity = report["parts"]["scan_parity"]
    assert parity["ok"] and {(r["backend"], r["dtype"], r["layout"]) for r in parity["rows"]} == {
        (b, d, layout) for b in ("torch", "triton") for d, layout in
        (("float32", "contiguous"), ("bfloat16", "contiguous"), ("bfloat16", "mixer"))
    }
    speed = report["parts"]["scan_speed"]["rows"]
    assert {(r["layer"], r["backend"], r["direction"]) for r in speed if "us" in r} == {
        (layer, b, d) for layer in ("DiM-L/2", "ZigMa-B/2") for b in ("triton", "torch") for d in ("forward", "backward")
    }
    training = report["parts"]["training"]["rows"]
    assert [(r["backbone"], r["tread"]) for r in training] == [
        (b, tread) for b in ("DiT-XL/2", "DiM-L/2", "ZigMa-B/2") for tread in (False, True)
    ]
    for base, routed in zip(training[::2], training[1::2]):
        assert routed["macs"] < base["macs"]  # the route really skips blocks
        assert routed["analytic_speedup"] == base["macs"] / routed["macs"]
    assert {r["backbone"] for r in report["parts"]["sampling"]["rows"]} == {"DiT-XL/2", "DiM-L/2", "ZigMa-B/2"}
    assert all(v["ok"] is None for v in report["verdicts"][:-1]), "a dry run judges no performance target"


def test_a_part_past_its_budget_is_cut_and_the_report_kept(tmp_path):
    result, report = run_check(tmp_path, "--only", "scan_parity", "training", "--budget-s", "3")
    parts = report["parts"]
    assert parts["environment"]["status"] == "ok"
    assert parts["scan_parity"]["status"] == "cut" and "budget" in parts["scan_parity"]["reason"]
    assert parts["scan_parity"]["seconds"] < 30  # the interpreter's parity takes longer than the budget
    assert parts["training"]["status"] == "skipped" and "total budget" in parts["training"]["reason"]
    assert "## scan parity (cut" in (tmp_path / "gpu_check.md").read_text()


def test_a_device_left_unusable_skips_the_later_parts(tmp_path, monkeypatch):
    def broken_part(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def cleanup_raises(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "scan_parity", broken_part)
    monkeypatch.setattr(gpu_check, "reset_memory", cleanup_raises)
    monkeypatch.setattr(gpu_check, "device_problem", lambda device: "CUDA error: an illegal memory access")
    args = argparse.Namespace(dry_run=True, out=str(tmp_path), only=["scan_parity", "training", "sampling"],
                              budget_s=60.0, argv=[])
    report = gpu_check.run(args)
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {"environment": "ok", "scan_parity": "failed", "training": "skipped", "sampling": "skipped"}
    assert "illegal memory access" in report["parts"]["training"]["reason"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["sampling"]["status"] == "skipped"


@pytest.mark.parametrize("name, datasheet", [("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                             ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA GeForce RTX 4090", None)])
def test_environment_turns_tf32_on_and_names_the_datasheet_peak(monkeypatch, name, datasheet):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(gpu_check, "device_name", lambda device: name)
    monkeypatch.setattr(gpu_check, "active_backend", lambda device: "triton")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        rows = []
        gpu_check.environment(torch.device("cuda"), rows)
        assert rows[0]["tf32"] and torch.backends.cudnn.allow_tf32  # as the trainer's train.tf32 default
        assert rows[0]["datasheet_bf16_tflops"] == datasheet
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_utilisation_counts_three_passes_of_two_flops_per_mac():
    # 1e9 MACs an image, 100 images/s: 6e11 FLOP/s = 0.6 TFLOP/s
    result = gpu_check.utilisation(10**9, 100.0, dict(measured=1.2, datasheet=2.4, unknown=None))
    assert result == pytest.approx(dict(tflops=0.6, mfu_measured=0.5, mfu_datasheet=0.25))


def test_gpu_check_imports_no_optional_dependency():
    code = (
        "import sys; sys.argv = ['gpu_check']; import runpy; "
        "runpy.run_path('tools/gpu_check.py', run_name='gpu_check'); "
        "print(sorted(m for m in ('diffusers', 'accelerate', 'matplotlib', 'timm', 'torchvision', 'scipy') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_triton_scan_rows_carry_the_compiled_kernels_estimate():
    row = gpu_check.kernel_estimate("triton", "ZigMa-B/2", torch.bfloat16, "forward", 32)
    assert set(row) == {"est_us", "roofline_us"} and row["est_us"] >= row["roofline_us"] > 0
    assert gpu_check.kernel_estimate("torch", "ZigMa-B/2", torch.bfloat16, "forward", 32) == {}
