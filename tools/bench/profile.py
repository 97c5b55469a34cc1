"""Where a training step's time goes: torch.profiler's self time per operator, with and without TREAD."""

from __future__ import annotations

import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from ssm_tread.models import count_macs
from tools.bench.env import synchronize
from tools.bench.step import MODES, build_step, mode


def profile_step(cfg: dict, device: torch.device | str = "cpu", warmup: int = 1, top: int = 15,
                 rounds: int = 3) -> dict:
    """Operator self time of the trainer's step without and with TREAD, ``rounds`` times A B (after
    ``warmup`` steps of each); per operator the median over rounds, so that one step slowed by another
    tenant does not decide. Returns {"ops": rows sorted by the no-routing time, each {"op",
    "baseline_ms", "tread_ms", "ratio"}, "total": the same summed over every operator}; ``ratio`` =
    baseline / TREAD, to compare with the analytic MAC ratio."""
    device = torch.device(device)
    setup = build_step(cfg, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in MODES:
        with mode(setup.model, name):
            for _ in range(warmup):
                setup.run()
    samples: dict[str, dict[str, list[float]]] = {}  # op -> mode -> ms per round
    totals: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(rounds):
        for name in MODES:
            with mode(setup.model, name), profile(activities=activities) as prof:
                setup.run()
                synchronize(device)
            per_op = {event.key: getattr(event, key, 0.0) / 1e3 for event in prof.key_averages()}
            totals[name].append(sum(per_op.values()))
            for op, ms in per_op.items():
                samples.setdefault(op, {m: [] for m in MODES})[name].append(ms)
    rows = []
    for op, by_mode in samples.items():
        base = statistics.median(by_mode["baseline"] + [0.0] * (rounds - len(by_mode["baseline"])))
        tread = statistics.median(by_mode["tread"] + [0.0] * (rounds - len(by_mode["tread"])))
        rows.append({"op": op, "baseline_ms": base, "tread_ms": tread, "ratio": base / tread if tread else None})
    rows.sort(key=lambda row: -row["baseline_ms"])
    total = {m: statistics.median(totals[m]) for m in MODES}
    macs = {"baseline": count_macs(setup.model, routed=False), "tread": count_macs(setup.model, routed=True)}
    return {"label": setup.label, "rounds": rounds, "ops": rows[:top],
            "total": {**{f"{m}_ms": total[m] for m in MODES}, "ratio": total["baseline"] / total["tread"]},
            "analytic_speedup": macs["baseline"] / macs["tread"]}


def profile_table(result: dict) -> str:
    """Markdown table of :func:`profile_step`."""
    lines = [f"{result['label']}: operator self time per step, median of {result.get('rounds', 1)} (analytic speedup "
             f"{result['analytic_speedup']:.3f})", "",
             "| operator | no routing ms | TREAD ms | ratio |", "|---|---|---|---|"]
    for row in result["ops"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| `{row['op']}` | {row['baseline_ms']:.1f} | {row['tread_ms']:.1f} | {ratio} |")
    t = result["total"]
    lines.append(f"| **all operators** | {t['baseline_ms']:.1f} | {t['tread_ms']:.1f} | {t['ratio']:.2f} |")
    return "\n".join(lines) + "\n"
