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
    configs = [(r["kernel"], r["config"].split(",")[0]) for r in results]
    assert configs == [
        (kernel, label)
        for label in ("DiM-L/2 layer E=2048 L=366", "DiM-L/2 layer E=2048 L=366",
                      "ZigMa-B/2 layer E=1536 L=256", "ZigMa-B/2 layer E=1536 L=256",
                      "bare scan (no D")
        for kernel in ("scan_fwd_kernel", "scan_bwd_kernel")
    ]
    assert sum("bf16" in r["config"] for r in results) == 4
    for r in results:
        assert set(r) == {"kernel", "config", "registers", "spills", "shared"}
        assert 0 < r["registers"] <= 255 and r["spills"] == 0, r
    assert "| scan_bwd_kernel |" in result.stdout
