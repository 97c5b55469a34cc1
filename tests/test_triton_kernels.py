"""Every Triton kernel compiles for Hopper (sm_90) on this GPU-less machine, at its run-time
configurations, without register spills: the CLI `tools/benchmark.py kernels`, run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "tools/benchmark.py", "kernels", "--arch", "90", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {r["kernel"] for r in results} == {"scan_fwd_kernel", "scan_bwd_kernel"}
    assert {(r["kernel"], "bf16" in r["config"], "DiM-L/2" in r["config"]) for r in results} == {
        (k, bf16, dim) for k in ("scan_fwd_kernel", "scan_bwd_kernel") for bf16 in (True, False) for dim in (True, False)
    }
    for r in results:
        assert set(r) == {"kernel", "config", "registers", "spills", "shared"}
        assert 0 < r["registers"] <= 255 and r["spills"] == 0, r
    assert "| scan_bwd_kernel |" in result.stdout
