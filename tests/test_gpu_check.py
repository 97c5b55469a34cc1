"""tools/gpu_check.py --dry-run: every part of the GPU check runs on CPU at toy sizes, so that the
command a person runs on their first GPU cannot rot; and its imports stay inside torch, triton, einops."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("scan_parity", "scan_speed", "training", "sampling", "torch_compile")


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the dry run switches it on
    cmd = [sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text() in result.stdout
    failed = {name: part.get("reason") for name, part in report["parts"].items() if part["status"] != "ok"}
    assert set(report["parts"]) == set(PARTS) and not failed, failed

    parity = report["parts"]["scan_parity"]
    assert parity["ok"] and {(r["backend"], r["dtype"]) for r in parity["rows"]} == {
        (b, d) for b in ("torch", "triton") for d in ("float32", "bfloat16")
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
