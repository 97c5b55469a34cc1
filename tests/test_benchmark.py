"""The step and router benchmarks and the convergence study's bookkeeping (CPU, tiny models, no timed
assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ssm_tread import benchmark as bench
from ssm_tread import study
from ssm_tread.models import count_macs, create_model


def tiny_dit(routes=((1, 2, 0.5),)) -> bench.StepConfig:
    return bench.StepConfig("tiny DiT", "DiT", dict(input_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=2,
                                                    num_classes=10), [list(r) for r in routes], batch_size=2)


# --------------------------------------------------------------------------------------------------
# step benchmark


@pytest.fixture(scope="module")
def step_result():
    torch.manual_seed(0)
    return bench.benchmark_step(tiny_dit(), "cpu", warmup=1, repeats=3, peak_tflops=1.0)


def test_step_result_fields_and_sane_values(step_result):
    r = step_result
    json.dumps(r)  # JSON-ready
    for key in ("label", "config", "routes", "device", "device_name", "scan_backend", "params", "batch_size",
                "macs_forward", "analytic_speedup", "speedup", "speedup_pairwise", "speedup_over_analytic",
                "speedup_cpu", "cpu_speedup_over_analytic", "order", "baseline", "tread"):
        assert key in r, key
    assert r["order"] == "ABBAAB"
    assert r["optimizer_step"]["wall_s"] > 0
    assert r["scan_backend"].startswith("n/a")
    assert r["params"] == sum(p.numel() for p in create_model("DiT", **tiny_dit().kwargs).parameters())
    assert r["macs_forward"]["tread"] < r["macs_forward"]["baseline"]
    assert r["analytic_speedup"] == pytest.approx(r["macs_forward"]["baseline"] / r["macs_forward"]["tread"])
    for name in bench.MODES:
        m = r[name]
        assert len(m["step_times_s"]) == 3 and all(t > 0 for t in m["step_times_s"])
        assert len(m["cpu_times_s"]) == 3
        median = m["step_time_s"]["median"]
        assert m["step_time_s"]["min"] <= median <= m["step_time_s"]["max"]
        assert m["images_per_s"] == pytest.approx(r["batch_size"] / median)
        assert m["tflops"] == pytest.approx(6 * r["macs_forward"][name] * m["images_per_s"] / 1e12)
        assert m["mfu"] == pytest.approx(m["tflops"] / 1.0)
        assert m["activation_bytes"] > 0
        assert m["peak_memory_bytes"] > m["activation_bytes"]
    assert r["tread"]["activation_bytes"] < r["baseline"]["activation_bytes"]  # fewer tokens in blocks 1-2
    assert r["speedup"] == pytest.approx(r["baseline"]["step_time_s"]["median"] / r["tread"]["step_time_s"]["median"])
    assert r["speedup_over_analytic"] == pytest.approx(r["speedup"] / r["analytic_speedup"])


def test_markdown_json_and_plot_are_written(step_result, tmp_path):
    paths = bench.write_outputs([step_result], {"date": "2026-11-22", "command": "test"}, tmp_path / "bench",
                                tmp_path / "bench.png")
    data = json.loads(paths["json"].read_text())
    assert data["results"][0]["label"] == "tiny DiT"
    table = paths["md"].read_text()
    assert "tiny DiT" in table and "speedup" in table
    assert paths["plot"].stat().st_size > 0


def hand_dit_macs(depth: int, dim: int, tokens: int, patch: int, channels: int, out_channels: int,
                  kept: dict[int, int]) -> int:
    """DiT forward MACs written out by hand: patch conv, timestep MLP (256 -> D -> D), per block adaLN
    (D -> 6D, once per image), qkv + proj + MLP (12 D^2 per token), attention (2 n^2 D), final adaLN
    (D -> 2D) and the final linear (D -> p^2 * out per token)."""
    total = tokens * (channels * patch * patch) * dim
    total += 256 * dim + dim * dim
    for block in range(depth):
        n = kept.get(block, tokens)
        total += 6 * dim * dim + n * 12 * dim * dim + 2 * n * n * dim
    total += 2 * dim * dim + tokens * dim * patch * patch * out_channels
    return total


def test_analytic_ratio_matches_a_hand_count(step_result):
    config = tiny_dit(routes=((1, 2, 0.5),))  # the config of step_result
    model = create_model(config.model, routes=config.routes, **config.kwargs)
    # 8x8 input, patch 2: 16 tokens; ratio 0.5 keeps 16 - floor(8) = 8 tokens in blocks 1 and 2
    full = hand_dit_macs(4, 32, 16, 2, 4, 8, {})
    routed = hand_dit_macs(4, 32, 16, 2, 4, 8, {1: 8, 2: 8})
    assert count_macs(model, routed=False) == full
    assert count_macs(model, routed=True) == routed
    assert step_result["macs_forward"] == {"baseline": full, "tread": routed}
    assert step_result["analytic_speedup"] == pytest.approx(full / routed)


def test_routing_off_swaps_the_router_back():
    setup = bench.build_step(tiny_dit())
    router = setup.model.router
    with bench.routing_off(setup.model):
        assert setup.model.router is not router and not setup.model.router.routes
    assert setup.model.router is router


def test_parse_config():
    c = bench.parse_config("model=DiM,hidden_size=64,depth=9,patch_size=2,batch=4,route=2:5:0.5")
    assert (c.model, c.batch_size, c.routes) == ("DiM", 4, [(2, 5, 0.5)])
    assert c.kwargs == dict(hidden_size=64, depth=9, patch_size=2)
    preset = bench.parse_config("dit-b2,batch=8")
    assert preset.batch_size == 8 and bench.PRESETS["dit-b2"].batch_size == 2
    paper = bench.parse_config("model=ZigMa,depth=12,hidden_size=32,route=paper")
    assert bench.resolve_routes(paper) == [(2, 8, 0.5)]
    with pytest.raises(ValueError):
        bench.parse_config("no-such-preset")


@pytest.mark.parametrize("preset", ["zigma-tiny", "dim-tiny"])
def test_router_overhead_on_scan_models(preset):
    config = bench.parse_config(preset)
    result = bench.benchmark_router(config, "cpu", steps=1, warmup=0, repeats=2)
    o = result["router"]
    assert set(o["times_s"]) == {"select", "gather", "scatter", "scan_orders", "total"}
    assert 0 < o["overhead_share"] and 0 <= o["overhead_share_cpu"]
    assert result["scan_backend"] in ("torch", "reference", "mamba_ssm")
    model = bench.build_step(config).model
    n = model.grid_positions.numel()
    fixed = model.seq_len - n  # DiM's prefix and padding tokens are never routed
    assert o["kept"] == fixed + n - n // 2


# --------------------------------------------------------------------------------------------------
# convergence study


def fake_run(backbone, mode, seed, fids, accs):
    return {"backbone": backbone, "mode": mode, "seed": seed, "params": 1000,
            "macs": {"full": 10, "routed": 7},
            "evals": [{"step": 10 * (i + 1), "fid": f, "accuracy": a, "train_wall_s": 1.0 + i + seed,
                       "train_cpu_s": 0.5 + i} for i, (f, a) in enumerate(zip(fids, accs))]}


def test_aggregation_matches_a_hand_computation():
    runs = {
        "a": fake_run("DiM", "scan", 0, [10.0, 4.0], [0.5, 0.9]),
        "b": fake_run("DiM", "scan", 1, [12.0, 5.0], [0.4, 0.8]),
        "c": fake_run("DiM", "scan", 2, [14.0, 9.0], [0.3, 1.0]),
        "d": fake_run("DiM", "none", 0, [20.0, 8.0], [0.1, 0.2]),
    }
    agg = study.aggregate(runs)
    first, last = agg["DiM"]["scan"]
    assert (first["step"], first["n"], last["step"]) == (10, 3, 20)
    # step 10: FID 10, 12, 14 -> mean 12, sample std sqrt((4 + 0 + 4) / 2) = 2
    assert first["fid_mean"] == pytest.approx(12.0) and first["fid_std"] == pytest.approx(2.0)
    # step 20: FID 4, 5, 9 -> mean 6, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7)
    assert last["fid_mean"] == pytest.approx(6.0) and last["fid_std"] == pytest.approx(math.sqrt(7.0))
    # accuracy 0.9, 0.8, 1.0 -> mean 0.9, std 0.1
    assert last["accuracy_mean"] == pytest.approx(0.9) and last["accuracy_std"] == pytest.approx(0.1)
    # training time 2, 3, 4 s -> mean 3, std 1
    assert last["train_wall_s_mean"] == pytest.approx(3.0) and last["train_wall_s_std"] == pytest.approx(1.0)
    single = agg["DiM"]["none"][1]
    assert (single["n"], single["fid_mean"], single["fid_std"]) == (1, 8.0, 0.0)


def test_paired_differences_and_equal_cost():
    runs = {
        "a": fake_run("ZigMa", "scan", 0, [10.0, 4.0], [0.5, 0.9]),
        "b": fake_run("ZigMa", "scan", 1, [12.0, 5.0], [0.4, 0.8]),
        "c": fake_run("ZigMa", "naive", 0, [11.0, 7.0], [0.5, 0.9]),
        "d": fake_run("ZigMa", "naive", 1, [15.0, 6.0], [0.4, 0.8]),
        "e": fake_run("ZigMa", "none", 0, [20.0, 8.0], [0.1, 0.5]),
    }
    diffs = study.paired_differences({"runs": runs}, "naive", "scan")["ZigMa"]
    # step 10: 11 - 10 = 1, 15 - 12 = 3 -> mean 2, std sqrt(2); step 20: 3, 1 -> mean 2, std sqrt(2)
    assert diffs[10][0] == pytest.approx(2.0) and diffs[10][1] == pytest.approx(math.sqrt(2.0)) and diffs[10][2] == 2
    assert diffs[20][0] == pytest.approx(2.0)
    rows = {r["mode"]: r for r in study.equal_cost_rows({"runs": runs})}
    # TREAD's 20 steps at 7/10 of the MACs equal 14 no-routing steps: FID 20 + (8 - 20) * 0.4 = 15.2
    assert rows["scan"]["compute_step"] == pytest.approx(14.0)
    assert rows["scan"]["compute_fid"] == pytest.approx(15.2)
    assert rows["scan"]["compute_accuracy"] == pytest.approx(0.1 + 0.4 * 0.4)
    assert study._interpolate(5.0, [10.0, 20.0], [1.0, 2.0]) is None


def test_study_table_and_plots(tmp_path):
    runs = {study.run_key(b, m, s): fake_run(b, m, s, [10.0 + s, 5.0 + s], [0.5, 0.6])
            for b in ("DiT", "ZigMa") for m in study.MODES for s in (0, 1)}
    data = {"runs": runs}
    table = study.markdown_table(data)
    assert "TREAD, scan-consistent" in table and "10.50 +- 0.71" in table
    for x in ("step", "train_wall_s"):
        path = tmp_path / f"{x}.png"
        study.plot_study(data, path, x=x)
        assert path.stat().st_size > 0


def test_study_runs_resume_and_modes_share_their_start(tmp_path):
    config = study.StudyConfig(
        backbones={"ZigMa": ("ZigMa", dict(hidden_size=16, depth=7, patch_size=4, d_state=4))},
        routes={"ZigMa": [(2, 3, 0.5)]}, modes=("none", "scan", "naive"), seeds=(0,), steps=2, batch_size=4,
        warmup_steps=1, eval_at=(2,), eval_samples=10, sample_steps=1, loss_every=1)
    data = study.run_study(config, tmp_path, log=None)
    assert len(data["runs"]) == 3
    for run in data["runs"].values():
        assert [e["step"] for e in run["evals"]] == [2]
        assert run["evals"][0]["train_wall_s"] > 0
    # the two TREAD modes start from the same weights, batches and subsets: their first losses agree
    scan, naive = (data["runs"][study.run_key("ZigMa", m, 0)]["losses"][0]["loss"] for m in ("scan", "naive"))
    assert scan == pytest.approx(naive, rel=1e-3)
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    study.run_study(config, tmp_path, log=None)  # everything is done: nothing reruns
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    other = study.StudyConfig(**{**config.__dict__, "steps": 3})
    with pytest.raises(ValueError):
        study.run_study(other, tmp_path, log=None)
