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
        assert {"kernel", "config", "registers", "spills", "shared", "est_us", "roofline_us", "loops"} <= set(r)
        assert 0 < r["registers"] <= 255 and r["spills"] == 0, r
        assert 0 < r["roofline_us"] <= r["est_us"], r
    assert "| scan_bwd_kernel |" in result.stdout


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_2:
        /*0010*/                   MUFU.EX2 R1, R2 ;
.L_x_1:
        /*0020*/                   SHFL.UP PT, R3, R1, 0x1, RZ ;
        /*0030*/                   LDS R4, [R5] ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/              @!P1 BRA `(.L_x_2) ;
        /*0070*/                   EXIT ;
.L_x_3:
        /*0080*/                   BRA `(.L_x_3);
"""


def test_sass_loops_counts_each_loops_own_instructions():
    from tools.bench.kernels import sass_loops

    straight, loops = sass_loops(SASS)
    assert straight["all"] == 3  # S2R, EXIT and the trap's self-branch
    by_depth = {loop["depth"]: loop for loop in loops}
    assert sorted(by_depth) == [1, 2]
    assert (by_depth[2]["all"], by_depth[2]["shuffles"], by_depth[2]["shared"]) == (3, 1, 1)
    assert (by_depth[1]["all"], by_depth[1]["sfu"], by_depth[1]["barriers"]) == (3, 1, 1)


def test_backward_compiles_each_scan_once():
    """The backward has two scans a state, h's and w's. triton 3.6 compiled w's a second time, in the
    layout it gave tiles loaded in reverse time order (steps 8 apart a thread), before those were read
    as runs forward in time (``load_reversed``)."""
    import torch

    from ssm_tread.ops.triton_scan import interpreted
    from tools.bench.kernels import compile_one, scan_launches

    if interpreted():
        pytest.skip("TRITON_INTERPRET is set: the interpreter has no compiler")
    kernel, launch = scan_launches(2048, 366, torch.bfloat16, device="meta")[1]
    compiled, _, spills = compile_one(kernel, launch, 90)
    assert compiled.asm["ttgir"].count('"tt.scan"') == 2
    assert spills == 0
