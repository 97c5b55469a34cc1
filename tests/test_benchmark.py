"""The benchmark and study tools (tools/bench/): CPU, tiny models, no timed assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssm_tread.models import count_macs, create_model
from ssm_tread.train.config import load_config
from tools.bench import study_report as report
from tools.bench.report import write_outputs
from tools.bench.router import benchmark_router, identity_blocks
from tools.bench.specs import PRESETS, parse_spec
from tools.bench.step import MODES, benchmark_step, build_step, routing_off, saved_activation_bytes, storage_id
from tools.bench.study import config_difference, grid, run_overrides, run_study
from helpers import randomize_zero_parameters

ROOT = Path(__file__).resolve().parents[1]
TINY_DIT = ("model=DiT,label=tiny DiT,input_size=8,patch_size=2,hidden_size=32,depth=4,num_heads=2,num_classes=10,"
            "route=1:2:0.5")


# --------------------------------------------------------------------------------------------------
# specs and the step benchmark


def test_spec_becomes_a_trainer_config():
    cfg = parse_spec("model=DiM,hidden_size=64,depth=9,patch_size=2,batch=4,route=2:5:0.5;6:6:0.25,objective=flow")
    assert (cfg["model"]["name"], cfg["model"]["kwargs"]) == ("DiM", dict(hidden_size=64, depth=9, patch_size=2))
    assert cfg["train"]["batch_size"] == 4 and cfg["diffusion"]["objective"] == "flow"
    assert cfg["routing"]["routes"] == [(2, 5, 0.5), (6, 6, 0.25)]
    assert (cfg["train"]["precision"], cfg["optim"]["lr"]) == ("fp32", 1e-4)  # benchmark default, base config
    tiny = parse_spec("dit-tiny,batch=8")
    assert tiny["train"]["batch_size"] == 8 and tiny["_label"] == "DiT-tiny"
    assert (tiny["_data"].image_size, tiny["_data"].num_classes) == (8, 10) and "input_size" not in tiny["model"]["kwargs"]
    assert parse_spec("model=ZigMa,depth=12,hidden_size=32")["routing"]["routes"] == [(2, 8, 0.5)]  # the paper's
    assert parse_spec("dit-b2")["routing"]["routes"] == [(2, 8, 0.5)] and "dit-b2" in PRESETS
    with pytest.raises(ValueError, match="unknown preset"):
        parse_spec("no-such-preset")
    with pytest.raises(ValueError, match="model=NAME"):
        parse_spec("batch=2")


def test_saved_activation_bytes_counts_the_tensors_autograd_keeps():
    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, 5, requires_grad=True)
    assert saved_activation_bytes(lambda: (a * b).sum(), set()) == 2 * 15 * 4  # mul saves both operands
    assert saved_activation_bytes(lambda: (a * b).sum(), {storage_id(a)}) == 15 * 4
    assert saved_activation_bytes(lambda: (a + b).sum(), set()) == 0  # add saves nothing


@pytest.fixture(scope="module")
def step_result():
    torch.manual_seed(0)
    return benchmark_step(parse_spec(TINY_DIT), "cpu", warmup=1, repeats=3, peak_tflops=1.0)


def test_step_result_is_complete_and_interleaved(step_result):
    r = step_result
    json.dumps(r)  # JSON-ready
    assert r["order"] == "ABBAAB"
    assert r["scan_backend"].startswith("n/a")
    for name in MODES:
        m = r[name]
        assert len(m["step_times_s"]) == 3 and all(t > 0 for t in m["step_times_s"])
        assert m["step_time_s"]["min"] <= m["step_time_s"]["median"] <= m["step_time_s"]["max"]
        assert m["peak_memory_bytes"] > m["activation_bytes"] > 0
    assert r["tread"]["activation_bytes"] < r["baseline"]["activation_bytes"]  # fewer tokens in blocks 1-2
    assert r["update_step"]["wall_s"] > 0


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
    # 8x8 input, patch 2: 16 tokens; ratio 0.5 keeps 16 - floor(8) = 8 tokens in blocks 1 and 2
    full = hand_dit_macs(4, 32, 16, 2, 4, 8, {})
    routed = hand_dit_macs(4, 32, 16, 2, 4, 8, {1: 8, 2: 8})
    model = create_model("DiT", input_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                         routes=[(1, 2, 0.5)])
    assert (count_macs(model, routed=False), count_macs(model, routed=True)) == (full, routed)
    assert step_result["macs_forward"] == {"baseline": full, "tread": routed}
    assert step_result["analytic_speedup"] == pytest.approx(full / routed)


def test_markdown_json_and_plot_are_written(step_result, tmp_path):
    paths = write_outputs([step_result], {"date": "2026-11-22", "command": "test"}, tmp_path / "bench",
                          tmp_path / "bench.png")
    assert json.loads(paths["json"].read_text())["results"][0]["label"] == "tiny DiT"
    table = paths["md"].read_text()
    assert "tiny DiT" in table and "speedup" in table
    assert paths["plot"].stat().st_size > 0


def test_routing_off_swaps_the_router_back():
    setup = build_step(parse_spec(TINY_DIT))
    router = setup.model.router
    with routing_off(setup.model):
        assert setup.model.router is not router and not setup.model.router.routes
    assert setup.model.router is router


# --------------------------------------------------------------------------------------------------
# router overhead


@pytest.mark.parametrize("preset", ["dit-tiny", "zigma-tiny", "dim-tiny"])
def test_with_identity_blocks_routing_changes_nothing(preset):
    """Tokens that skip identity blocks re-enter unchanged: the routed forward equals the unrouted one, so
    what the routed one costs more is the router's work alone."""
    model = build_step(parse_spec(preset)).model
    randomize_zero_parameters(model)  # the final layer starts at zero: every output would be 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.tensor([1, 2])
    torch.manual_seed(1)
    before = model(x, t, y)
    with identity_blocks(model):
        torch.manual_seed(1)
        routed = model(x, t, y)
        with routing_off(model):
            torch.manual_seed(1)
            unrouted = model(x, t, y)
    torch.testing.assert_close(routed, unrouted, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    torch.testing.assert_close(model(x, t, y), before, rtol=0, atol=0)  # the blocks are back
    assert not torch.allclose(routed, before)


@pytest.mark.parametrize("preset,length,kept", [("zigma-tiny", 16, 8), ("dim-tiny", 54, 46)])
def test_router_overhead_on_scan_models(preset, length, kept):
    # 8x8 input, patch 2: a 4x4 grid, half of it routed; DiM adds 5 prefix tokens and pads the grid to 7x7,
    # never routed: 5 + 49 = 54 tokens of which 54 - 8 stay
    result = benchmark_router(parse_spec(preset), "cpu", steps=1, warmup=0, repeats=2)
    o = result["router"]
    assert (o["length"], o["kept"]) == (length, kept)
    assert {"enter", "exit", "scan"} <= set(o["forward_parts_s"])
    assert o["routed_step_cpu_s"] > 0 and o["routed_step_s"] > 0
    assert result["scan_backend"] in ("torch", "reference", "mamba_ssm")


# --------------------------------------------------------------------------------------------------
# convergence study


def test_study_file_is_a_trainer_config_with_a_grid():
    cfg = load_config("configs/study_digits.py")
    runs = grid(cfg)
    assert len(runs) == 27 and runs[:3] == [("DiT", "none", 0), ("DiT", "scan", 0), ("DiT", "naive", 0)]
    assert grid(cfg, seeds=[1], modes=["naive"]) == [("DiT", "naive", 1), ("DiM", "naive", 1), ("ZigMa", "naive", 1)]
    run = load_config("configs/study_digits.py", run_overrides(cfg, "ZigMa", "naive", 2, "runs/x"))
    assert (run["model"]["name"], run["routing"]["scan_consistent"], run["train"]["seed"]) == ("ZigMa", False, 2)
    assert run["model"]["kwargs"]["hidden_size"] == 68 and run["routing"]["routes"] == [(2, 5, 0.5)]
    none = load_config("configs/study_digits.py", run_overrides(cfg, "DiT", "none", 0, "runs/x"))
    assert none["routing"]["routes"] == [] and none["model"]["name"] == "DiT"
    with pytest.raises(ValueError, match="not in the study"):
        grid(cfg, seeds=[7])


def test_long_digits_study_is_the_probe_schedule_with_checkpoints():
    """The 1500-step digits study: the 250-step study's models and data with the probe's schedule, 24 runs."""
    short, cfg = load_config("configs/study_digits.py"), load_config("configs/study_digits_1500.py")
    assert cfg["_study"]["backbones"] == short["_study"]["backbones"] and cfg["data"] == short["data"]
    assert len(grid(cfg)) == 24 and ("DiT", "naive", 1) not in grid(cfg)
    o, t = cfg["optim"], cfg["train"]
    assert (o["lr"], o["warmup_steps"], o["schedule"], o["min_lr"]) == (2e-3, 50, "cosine", 5e-4)
    assert (t["steps"], t["ema_decay"], cfg["eval"]["every"]) == (1500, 0.995, 250)
    assert t["ckpt_every"] and t["steps"] % t["ckpt_every"] == 0  # a cut-off run continues from a checkpoint


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
    agg = report.aggregate(runs)
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
    diffs = report.paired_differences({"runs": runs}, "naive", "scan")["ZigMa"]
    # step 10: 11 - 10 = 1, 15 - 12 = 3 -> mean 2, std sqrt(2); step 20: 3, 1 -> mean 2, std sqrt(2)
    assert diffs[10][0] == pytest.approx(2.0) and diffs[10][1] == pytest.approx(math.sqrt(2.0)) and diffs[10][2] == 2
    assert diffs[20][0] == pytest.approx(2.0)
    rows = {r["mode"]: r for r in report.equal_cost_rows({"runs": runs})}
    # TREAD's 20 steps at 7/10 of the MACs equal 14 no-routing steps: FID 20 + (8 - 20) * 0.4 = 15.2
    assert rows["scan"]["compute_step"] == pytest.approx(14.0)
    assert rows["scan"]["compute_fid"] == pytest.approx(15.2)
    assert rows["scan"]["compute_accuracy"] == pytest.approx(0.1 + 0.4 * 0.4)
    assert report._interpolate(5.0, [10.0, 20.0], [1.0, 2.0]) is None


def test_paired_equal_cost_matches_a_hand_computation():
    runs = {
        "a": fake_run("ZigMa", "scan", 0, [10.0, 4.0], [0.5, 0.9]),
        "b": fake_run("ZigMa", "scan", 1, [12.0, 5.0], [0.4, 0.8]),
        "c": fake_run("ZigMa", "none", 0, [20.0, 8.0], [0.1, 0.5]),
        "d": fake_run("ZigMa", "none", 1, [30.0, 10.0], [0.1, 0.5]),
        "e": fake_run("ZigMa", "naive", 2, [9.0, 3.0], [0.5, 0.9]),  # no no-routing run of seed 2: left out
    }
    # 20 TREAD steps at 7/10 of the MACs = 14 no-routing steps: seed 0 4 - (20 - 12 * 0.4) = -11.2,
    # seed 1 5 - (30 - 20 * 0.4) = -17 -> mean -14.1, sample std 2.9 * sqrt(2)
    mean, std, n = report.paired_equal_cost({"runs": runs}, "compute")["ZigMa"]["scan"]
    assert (mean, std, n) == (pytest.approx(-14.1), pytest.approx(2.9 * math.sqrt(2)), 2)
    # equal CPU time: TREAD's last clock 1.5 s is the no-routing runs' last evaluation: 4 - 8, 5 - 10
    mean, std, n = report.paired_equal_cost({"runs": runs}, "train_cpu_s")["ZigMa"]["scan"]
    assert (mean, std, n) == (pytest.approx(-4.5), pytest.approx(math.sqrt(0.5)), 2)
    assert "naive" not in report.paired_equal_cost({"runs": runs})["ZigMa"]


def test_study_table_and_plots(tmp_path, monkeypatch):
    runs = {report.run_key(b, m, s): fake_run(b, m, s, [10.0 + s, 5.0 + s], [0.5, 0.6])
            for b in ("DiT", "ZigMa") for m in report.MODES for s in (0, 1) if (b, m) != ("DiT", "naive")}
    data = {"runs": runs}
    table = report.markdown_table(data)
    assert "TREAD, scan-consistent" in table and "10.50 +- 0.71" in table
    import matplotlib.figure

    saved, savefig = [], matplotlib.figure.Figure.savefig

    def keep_and_save(fig, *args, **kwargs):
        saved.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_and_save)
    for x in ("step", "compute", "train_wall_s"):
        path = tmp_path / f"{x}.png"
        report.plot_study(data, path, x=x)
        assert path.stat().st_size > 0
    # the first column (DiT) has no naive-order runs: ZigMa's FID panel must name that mode itself
    zigma_fid = saved[0].axes[1]
    labels = [t.get_text() for t in zigma_fid.get_legend().get_texts()]
    assert labels == [f"{report.MODE_LABELS[m]} (n=2)" for m in report.MODES]


def test_study_trains_through_the_trainer_and_resumes(tmp_path):
    config = tmp_path / "tiny_study.py"
    config.write_text(textwrap.dedent("""
        from base import *
        model.update(name="ZigMa", kwargs=dict(hidden_size=16, depth=7, patch_size=4, d_state=4), learn_sigma=False)
        diffusion["objective"] = "flow"
        data.update(name="digits", num_workers=0)
        optim.update(lr=1e-3, warmup_steps=1)
        train.update(steps=4, batch_size=4, ckpt_every=2, keep_last=2, keep_every=0, cpu_threads=1)
        log.update(every=1, grid_every=0, tensorboard=False)
        sample.update(sampler="euler", steps=1, batch_size=20, grid_classes=[0, 1], grid_per_class=2)
        eval.update(num_samples=20, every=4)
        study = dict(backbones={"ZigMa": (model["name"], model["kwargs"])}, routes={"ZigMa": [(2, 3, 0.5)]},
                     modes=("none", "scan", "naive"), seeds=(0, 1))
    """))
    data = run_study(str(config), tmp_path / "runs", workers=2, seeds=[0])
    assert sorted(data["runs"]) == ["ZigMa|naive|0", "ZigMa|none|0", "ZigMa|scan|0"]
    for run in data["runs"].values():
        assert [e["step"] for e in run["evals"]] == [4] and run["evals"][0]["train_wall_s"] > 0
        assert set(run["evals"][0]) == {"step", "fid", "accuracy", "train_wall_s", "train_cpu_s"}
    # the two TREAD modes start from the same weights, batches and subsets: their first losses agree
    scan, naive = (data["runs"][f"ZigMa|{m}|0"]["losses"][0]["loss"] for m in ("scan", "naive"))
    assert scan == pytest.approx(naive, rel=1e-3)
    assert data["runs"]["ZigMa|none|0"]["macs"]["full"] == data["runs"]["ZigMa|scan|0"]["macs"]["full"]
    assert data["runs"]["ZigMa|scan|0"]["macs"]["routed"] < data["runs"]["ZigMa|scan|0"]["macs"]["full"]
    # a run cut off after its step-2 checkpoint continues from it, to the same losses
    cut = tmp_path / "runs" / "ZigMa-scan-seed0"
    (cut / "eval.json").unlink()
    (cut / "checkpoints" / "step-0000004.pt").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/eval.json")}
    again = run_study(str(config), tmp_path / "runs", seeds=[0])["runs"]
    assert len(again) == 3 and (cut / "eval.json").is_file()
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # the finished runs: not trained again
    log = (cut / "train.log").read_text()
    assert "resuming from step 2" in log and "Traceback" not in log
    first, second = data["runs"]["ZigMa|scan|0"], again["ZigMa|scan|0"]
    assert [r["step"] for r in second["losses"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in second["losses"]] == pytest.approx([r["loss"] for r in first["losses"]], rel=1e-5)
    # the same study file in another checkout still owns its runs: nothing is trained again or left out
    moved = tmp_path / "elsewhere" / "tiny_study.py"
    moved.parent.mkdir()
    moved.write_text(config.read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/eval.json")}
    assert len(run_study(str(moved), tmp_path / "runs", seeds=[0])["runs"]) == 3
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    # a changed value does not: the study names it
    moved.write_text(config.read_text().replace("lr=1e-3", "lr=2e-3"))
    cfg = load_config(str(moved))
    changed = load_config(str(moved), run_overrides(cfg, "ZigMa", "scan", 0, tmp_path / "runs"))
    assert config_difference(changed) == "optim.lr was 0.001, is 0.002"


def test_mnist_study_is_the_16x16_token_grid_of_equal_sized_models():
    cfg = load_config("configs/study_mnist.py")
    runs = grid(cfg)
    # 3 backbones x 3 modes x 3 seeds, less DiT's naive runs (DiT never asks for a scan order)
    assert len(runs) == 24 and ("DiT", "naive", 0) not in runs and ("DiM", "naive", 2) in runs
    params = {}
    for backbone in cfg["_study"]["backbones"]:
        run = load_config("configs/study_mnist.py", run_overrides(cfg, backbone, "scan", 0, "runs/x"))
        assert run["data"]["name"] == "mnist" and run["model"]["kwargs"]["patch_size"] == 2
        assert run["routing"]["routes"] == [(2, run["model"]["kwargs"]["depth"] - 4, 0.5)]  # the paper's route
        model = create_model(run["model"]["name"], input_size=32, in_channels=1, num_classes=10, learn_sigma=False,
                             **run["model"]["kwargs"])
        assert model.x_embedder.num_patches == 16 * 16  # ImageNet-256's latent grid at patch 2
        params[backbone] = sum(p.numel() for p in model.parameters())
    assert 3e6 < min(params.values()) and max(params.values()) < 1.1 * min(params.values())
    assert run["train"]["steps"] >= 2000 and run["eval"]["every"] and run["train"]["steps"] % run["eval"]["every"] == 0


def test_mnist_study_dry_run_end_to_end(tmp_path):
    """The study command as a user runs it, at toy size: every run of the grid's first seed trains on MNIST
    through tools/train.py, is evaluated, and lands in the report; a second call trains nothing."""
    cmd = [sys.executable, "tools/benchmark.py", "study", "configs/study_mnist.py", "--dry-run", "--workers", "2",
           "--runs", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report_dir = tmp_path / "runs" / "report"
    data = json.loads((report_dir / "study.json").read_text())
    expected = {report.run_key(b, m, 0) for b in ("DiT", "DiM", "ZigMa") for m in report.MODES} - {"DiT|naive|0"}
    assert set(data["runs"]) == expected and data["config"]["dry_run"]
    for run in data["runs"].values():
        assert [e["step"] for e in run["evals"]] == [1, 2] and run["params"] < 1e5  # toy width
        assert 0 <= run["evals"][-1]["accuracy"] <= 1
    saved = json.loads((tmp_path / "runs" / "ZigMa-naive-seed0" / "config.json").read_text())
    assert saved["data"]["name"] == "mnist" and saved["routing"]["scan_consistent"] is False
    assert saved["model"]["kwargs"]["depth"] == 9 and saved["routing"]["routes"] == [[2, 5, 0.5]]
    assert "Convergence study study_mnist (dry run" in (report_dir / "study.md").read_text()
    assert all((report_dir / f"study_mnist_{axis}.png").stat().st_size for axis in ("steps", "wallclock", "cputime"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/eval.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "8 of 24 runs" in again.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/eval.json")}
