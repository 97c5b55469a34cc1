"""The convergence study's statistics, tables and plots: mean and sample std over seeds per backbone, mode
and evaluation step; paired differences between modes; each TREAD mode against no routing at equal
analytic compute and at equal measured training time.

A run is a dict ``{"backbone", "mode", "seed", "params", "macs": {"full", "routed"}, "evals": [{"step",
"fid", "accuracy", "train_wall_s", "train_cpu_s"}, ...], "losses": [{"step", "loss"}, ...]}``
(:func:`tools.bench.study.collect_run` reads one from a trainer run directory); the study data is
``{"config", "meta", "runs": {run_key: run}}``.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

MODES = ("none", "scan", "naive")
MODE_LABELS = {"none": "no routing", "scan": "TREAD, scan-consistent", "naive": "TREAD, naive random order"}
MODE_STYLE = {"none": ("tab:gray", "-"), "scan": ("tab:blue", "-"), "naive": ("tab:orange", "--")}
METRICS = ("fid", "accuracy")


def run_key(backbone: str, mode: str, seed: int) -> str:
    return f"{backbone}|{mode}|{seed}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def aggregate(runs: dict | list) -> dict:
    """Per backbone, mode and evaluation step: mean and sample std over seeds of FID, accuracy and the
    training time so far. Returns {backbone: {mode: [{"step", "n", "fid_mean", "fid_std", ...}, ...]}}."""
    runs = list(runs.values()) if isinstance(runs, dict) else list(runs)
    grouped: dict = {}
    for run in runs:
        for point in run["evals"]:
            slot = grouped.setdefault(run["backbone"], {}).setdefault(run["mode"], {}).setdefault(point["step"], [])
            slot.append(point)
    out: dict = {}
    for backbone, modes in grouped.items():
        for mode, steps in modes.items():
            rows = []
            for step in sorted(steps):
                points = steps[step]
                row = {"step": step, "n": len(points)}
                for key in (*METRICS, "train_wall_s", "train_cpu_s"):
                    row[f"{key}_mean"], row[f"{key}_std"] = mean_std([p[key] for p in points])
                rows.append(row)
            out.setdefault(backbone, {})[mode] = rows
    return out


def params_of(runs: dict | list) -> dict:
    """backbone -> parameter count (of the unrouted model; routing adds none)."""
    runs = list(runs.values()) if isinstance(runs, dict) else list(runs)
    return {run["backbone"]: run["params"] for run in runs}


def per_step_table(agg: dict, steps: list[int], title: str, field: str, fmt: str) -> list[str]:
    """Markdown lines: ``field`` (mean +- std over seeds) of every backbone and mode at each evaluation step."""
    lines = ["", f"{title} (mean +- std over seeds) at each evaluation step:", "",
             "| backbone | mode | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for backbone, modes in agg.items():
        for mode in MODES:
            if mode not in modes:
                continue
            by_step = {row["step"]: row for row in modes[mode]}
            cells = [f"{by_step[s][field + '_mean']:{fmt}} +- {by_step[s][field + '_std']:{fmt}}" if s in by_step
                     else "-" for s in steps]
            lines.append(f"| {backbone} | {MODE_LABELS[mode]} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(data: dict) -> str:
    """Final-step FID and accuracy (mean +- std over seeds) per backbone and mode, the time they took,
    and FID at every evaluation step."""
    runs = data["runs"]
    agg = aggregate(runs)
    order = list(data.get("config", {}).get("backbones", {}))
    agg = {b: agg[b] for b in sorted(agg, key=lambda b: order.index(b) if b in order else len(order))}
    params = params_of(runs)
    macs = {}
    for run in runs.values():
        macs[(run["backbone"], run["mode"])] = run["macs"]["routed"] if run["mode"] != "none" else run["macs"]["full"]
    lines = ["| backbone | params | mode | seeds | FID (final) | accuracy (final) | training wall s | training CPU s "
             "| fwd MACs/image |", "|---|---|---|---|---|---|---|---|---|"]
    for backbone, modes in agg.items():
        for mode in MODES:
            if mode not in modes:
                continue
            last = modes[mode][-1]
            lines.append(
                f"| {backbone} | {params[backbone] / 1e6:.2f}M | {MODE_LABELS[mode]} | {last['n']} "
                f"| {last['fid_mean']:.3f} +- {last['fid_std']:.3f} "
                f"| {last['accuracy_mean']:.3f} +- {last['accuracy_std']:.3f} "
                f"| {last['train_wall_s_mean']:.0f} +- {last['train_wall_s_std']:.0f} "
                f"| {last['train_cpu_s_mean']:.0f} +- {last['train_cpu_s_std']:.0f} "
                f"| {macs[(backbone, mode)] / 1e6:.1f}M |"
            )
    steps = sorted({row["step"] for modes in agg.values() for rows in modes.values() for row in rows})
    lines += per_step_table(agg, steps, "FID", "fid", ".2f")
    lines += per_step_table(agg, steps, "Class accuracy", "accuracy", ".3f")
    lines += ["", "At equal training cost: each TREAD mode after its last step against the no-routing run at the "
              "same analytic compute (steps x forward MACs) and at the same measured training CPU time (mean "
              "curves over seeds, linear interpolation between evaluations; '-': outside the measured range):", "",
              "| backbone | mode | TREAD FID / accuracy (step) | no routing at equal MACs: FID / accuracy (~step) "
              "| no routing at equal CPU time: FID / accuracy (~step) |", "|---|---|---|---|---|"]

    def cell(fid, acc, step):
        return "-" if fid is None else f"{fid:.2f} / {acc:.3f} (~{step:.0f})"

    for row in equal_cost_rows(data):
        lines.append(f"| {row['backbone']} | {MODE_LABELS[row['mode']]} "
                     f"| {row['fid']:.2f} / {row['accuracy']:.3f} ({row['step']}) "
                     f"| {cell(row['compute_fid'], row['compute_accuracy'], row['compute_step'])} "
                     f"| {cell(row['time_fid'], row['time_accuracy'], row['time_step'] or 0)} |")
    lines += ["", "Paired by seed at equal training cost: each TREAD run's final FID minus its own seed's no-routing "
              "FID at the same analytic compute / the same training CPU time; mean +- std over seeds (negative: "
              "TREAD ahead):", "", "| backbone | mode | at equal MACs | at equal CPU time |", "|---|---|---|---|"]
    at_compute, at_time = paired_equal_cost(data, "compute"), paired_equal_cost(data, "train_cpu_s")

    def paired(table, backbone, mode):
        value = table.get(backbone, {}).get(mode)
        return "-" if value is None else f"{value[0]:+.2f} +- {value[1]:.2f} (n={value[2]})"

    for backbone in agg:
        for mode in ("scan", "naive"):
            if mode in agg[backbone] and "none" in agg[backbone]:
                lines.append(f"| {backbone} | {MODE_LABELS[mode]} | {paired(at_compute, backbone, mode)} "
                             f"| {paired(at_time, backbone, mode)} |")
    for a, b, title in (("naive", "scan", "naive minus scan-consistent (positive: keeping the scan order helps)"),
                        ("scan", "none", "scan-consistent TREAD minus no routing, at equal steps")):
        diffs = paired_differences(data, a, b)
        if not diffs:
            continue
        steps_ = sorted({s for d in diffs.values() for s in d})
        lines += ["", f"FID difference per seed, {title}; mean +- std over seeds:", "",
                  "| backbone | " + " | ".join(f"step {s}" for s in steps_) + " |", "|---|" + "---|" * len(steps_)]
        for backbone in agg:
            if backbone not in diffs:
                continue
            cells = [f"{diffs[backbone][s][0]:+.2f} +- {diffs[backbone][s][1]:.2f} (n={diffs[backbone][s][2]})"
                     if s in diffs[backbone] else "-" for s in steps_]
            lines.append(f"| {backbone} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Piecewise-linear y(x) through the points (xs ascending); None outside their range."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def equal_cost_rows(data: dict, time_key: str = "train_cpu_s") -> list[dict]:
    """Each TREAD mode's final FID and accuracy against the no-routing run at the same training cost,
    measured two ways: analytic compute (steps x forward MACs per image; TREAD's last step is worth
    ``steps x routed MACs / full MACs`` no-routing steps) and measured training time (``time_key``).
    Uses the mean curves over seeds, interpolated linearly; None where the no-routing curve does not reach
    back that far."""
    agg = aggregate(data["runs"])
    macs = {(r["backbone"], r["mode"]): r["macs"] for r in data["runs"].values()}
    rows = []
    for backbone, modes in agg.items():
        base = modes.get("none")
        if not base:
            continue
        steps = [r["step"] for r in base]
        times = [r[f"{time_key}_mean"] for r in base]
        fids = [r["fid_mean"] for r in base]
        accs = [r["accuracy_mean"] for r in base]
        for mode in ("scan", "naive"):
            if mode not in modes:
                continue
            last = modes[mode][-1]
            m = macs[(backbone, mode)]
            equal_step = last["step"] * m["routed"] / m["full"]
            t = last[f"{time_key}_mean"]
            rows.append({"backbone": backbone, "mode": mode, "step": last["step"], "time": t,
                         "fid": last["fid_mean"], "accuracy": last["accuracy_mean"],
                         "compute_step": equal_step,
                         "compute_fid": _interpolate(equal_step, steps, fids),
                         "compute_accuracy": _interpolate(equal_step, steps, accs),
                         "time_step": _interpolate(t, times, steps),
                         "time_fid": _interpolate(t, times, fids),
                         "time_accuracy": _interpolate(t, times, accs)})
    return rows


def compute_ratio(run: dict) -> float:
    """Forward MACs per image of the run's mode over the unrouted model's: a step of a TREAD run is worth
    this many no-routing steps of analytic compute."""
    return 1.0 if run["mode"] == "none" else run["macs"]["routed"] / run["macs"]["full"]


def paired_equal_cost(data: dict, cost: str = "compute") -> dict:
    """Per backbone and TREAD mode: mean and sample std over seeds of the TREAD run's final FID minus the
    FID of the same seed's no-routing run at equal cost, ``cost`` "compute" (analytic: steps x forward
    MACs) or "train_cpu_s" (measured), interpolated linearly between that run's evaluations; seeds whose
    no-routing curve does not reach back that far are left out. {backbone: {mode: (mean, std, n)}}."""
    by_key = {(r["backbone"], r["mode"], r["seed"]): r for r in data["runs"].values()}
    out: dict = {}
    for (backbone, mode, seed), run in by_key.items():
        base = by_key.get((backbone, "none", seed))
        if mode == "none" or base is None:
            continue
        last = run["evals"][-1]
        if cost == "compute":
            at, xs = last["step"] * compute_ratio(run), [e["step"] for e in base["evals"]]
        else:
            at, xs = last[cost], [e[cost] for e in base["evals"]]
        fid = _interpolate(at, xs, [e["fid"] for e in base["evals"]])
        if fid is not None:
            out.setdefault(backbone, {}).setdefault(mode, []).append(last["fid"] - fid)
    return {backbone: {mode: (*mean_std(values), len(values)) for mode, values in modes.items()}
            for backbone, modes in out.items()}


def paired_differences(data: dict, a: str, b: str, metric: str = "fid") -> dict:
    """Per backbone and evaluation step: mean and sample std over seeds of metric(a) - metric(b), pairing
    the runs of one seed (same initial weights, batches and noise)."""
    runs = list(data["runs"].values())
    by_key = {(r["backbone"], r["mode"], r["seed"]): r for r in runs}
    out: dict = {}
    for (backbone, mode, seed), run in by_key.items():
        if mode != a or (backbone, b, seed) not in by_key:
            continue
        other = {e["step"]: e[metric] for e in by_key[(backbone, b, seed)]["evals"]}
        for e in run["evals"]:
            if e["step"] in other:
                out.setdefault(backbone, {}).setdefault(e["step"], []).append(e[metric] - other[e["step"]])
    return {backbone: {step: (*mean_std(values), len(values)) for step, values in sorted(steps.items())}
            for backbone, steps in out.items()}


def plot_study(data: dict, path: str | os.PathLike, x: str = "step") -> None:
    """FID (top row) and class accuracy (bottom row) against ``x`` ("step", "compute": analytic training
    compute in no-routing steps, "train_wall_s" or "train_cpu_s"), one column per backbone, mean +- std over
    seeds (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(data["runs"])
    params = params_of(data["runs"])
    order = list(data.get("config", {}).get("backbones", {}))
    backbones = sorted(agg, key=lambda b: order.index(b) if b in order else len(order))
    fig, axes = plt.subplots(2, len(backbones), figsize=(4.6 * len(backbones), 7.2), squeeze=False)
    xlabel = {"step": "training step", "compute": "analytic training compute (no-routing steps)",
              "train_wall_s": "training wall-clock time (s)", "train_cpu_s": "training CPU time (s)"}[x]
    ratio = {(r["backbone"], r["mode"]): compute_ratio(r) for r in data["runs"].values()}
    for col, backbone in enumerate(backbones):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for mode in MODES:
                rows = agg[backbone].get(mode)
                if not rows:
                    continue
                colour, style = MODE_STYLE[mode]
                xs = [r["step"] * (ratio[(backbone, mode)] if x == "compute" else 1) if x in ("step", "compute")
                      else r[f"{x}_mean"] for r in rows]
                mean = [r[f"{metric}_mean"] for r in rows]
                std = [r[f"{metric}_std"] for r in rows]
                ax.plot(xs, mean, style, color=colour, marker="o", ms=3, label=f"{MODE_LABELS[mode]} (n={rows[-1]['n']})")
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colour, alpha=0.15)
            ax.set_title(f"{backbone} ({params[backbone] / 1e6:.2f}M params)" if row == 0 else "")
            ax.set_ylabel("digits FID (lower is better)" if metric == "fid" else "class accuracy of samples")
            if metric == "fid":
                ax.set_yscale("log")
            else:
                ax.axhline(0.1, color="black", lw=0.8, ls=":", label="chance (10 classes)" if col == 0 else None)
                ax.set_ylim(0, 1)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if row == 0 or col == 0:  # each FID panel names its own modes: DiT has no naive-order runs
                ax.legend(fontsize=8)
    name = Path(data.get("config", {}).get("file", "study")).stem
    fig.suptitle(f"{name}: mean \u00b1 std over seeds (shaded), against {xlabel}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
