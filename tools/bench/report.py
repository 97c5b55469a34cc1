"""The step benchmark's report: Markdown tables (throughput, memory, speedups, router overhead) and a plot."""

from __future__ import annotations

import os
from pathlib import Path

from tools.bench.env import write_report
from tools.bench.router import router_table


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def markdown_table(results: list[dict]) -> str:
    """The step benchmark as Markdown tables: throughput and memory, speedups, router overhead."""
    lines = [
        "| config | scan backend | params | batch | GMACs fwd (full -> TREAD) | step s, wall (base / TREAD) "
        "| step s, CPU time (base / TREAD) | img/s, wall (base / TREAD) | TFLOP/s wall (base / TREAD) "
        "| MFU wall (base / TREAD) | TFLOP/s CPU time (base / TREAD) | MFU CPU time (base / TREAD) "
        "| act. mem GiB (base / TREAD) | peak mem GiB (base / TREAD) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, t = r["baseline"], r["tread"]
        mfu = "-" if b["mfu"] is None else f"{_pct(b['mfu'])} / {_pct(t['mfu'])}"
        mfu_cpu = "-" if b.get("mfu_cpu") is None else f"{_pct(b['mfu_cpu'])} / {_pct(t['mfu_cpu'])}"
        tflops_cpu = "-" if b.get("tflops_cpu") is None else f"{b['tflops_cpu']:.4f} / {t['tflops_cpu']:.4f}"
        lines.append(
            f"| {r['label']} | {r['scan_backend']} | {r['params'] / 1e6:.1f}M | {r['batch_size']} "
            f"| {r['macs_forward']['baseline'] / 1e9:.3f} -> {r['macs_forward']['tread'] / 1e9:.3f} "
            f"| {b['step_time_s']['median']:.3f} / {t['step_time_s']['median']:.3f} "
            f"| {b['cpu_time_s']['median']:.3f} / {t['cpu_time_s']['median']:.3f} "
            f"| {b['images_per_s']:.2f} / {t['images_per_s']:.2f} "
            f"| {b['tflops']:.4f} / {t['tflops']:.4f} | {mfu} | {tflops_cpu} | {mfu_cpu} "
            f"| {_gib(b.get('activation_bytes'))} / {_gib(t.get('activation_bytes'))} "
            f"| {_gib(b.get('peak_memory_bytes'))} / {_gib(t.get('peak_memory_bytes'))} |"
        )
    lines += ["", "| config | analytic speedup (MAC ratio) | wall: ratio of medians | wall: median pairwise "
              "| wall / analytic | CPU time: ratio of medians | CPU time: median pairwise | **CPU time / analytic** "
              "| target >= 0.90 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cpu = r.get("cpu_speedup_over_analytic")
        primary = cpu if cpu is not None and not r["device"].startswith("cuda") else r["speedup_over_analytic"]
        lines.append(
            f"| {r['label']} | {r['analytic_speedup']:.3f} | {r['speedup']:.3f} | {r['speedup_pairwise']['median']:.3f} "
            f"| {r['speedup_over_analytic']:.3f} | {r['speedup_cpu']:.3f} | {r['speedup_cpu_pairwise']['median']:.3f} "
            f"| **{cpu:.3f}** | {'met' if primary >= 0.9 else 'MISSED'} |"
        )
    with_router = [r for r in results if "router" in r]
    if with_router:
        lines += ["", router_table(with_router).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot_step_benchmarks(results: list[dict], path: str | os.PathLike) -> None:
    """Left: step times of both modes, wall clock (solid) and CPU time (hatched), median with min..max bars.
    Right: measured speedups (ratio of medians, wall and CPU time; per-repeat CPU-time ratios as dots)
    against the analytic MAC ratio and the 90% target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in results]
    n = len(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(6 + 2.6 * n, 4.8))
    width = 0.2
    bars = (("baseline", "step_time_s", "tab:gray", "", "no routing, wall"),
            ("tread", "step_time_s", "tab:blue", "", "TREAD, wall"),
            ("baseline", "cpu_time_s", "lightgray", "//", "no routing, CPU time"),
            ("tread", "cpu_time_s", "lightsteelblue", "//", "TREAD, CPU time"))
    for k, (name, key, colour, hatch, label) in enumerate(bars):
        medians = [r[name][key]["median"] for r in results]
        low = [m - r[name][key]["min"] for m, r in zip(medians, results)]
        high = [r[name][key]["max"] - m for m, r in zip(medians, results)]
        xs = [i + (k - 1.5) * width for i in range(n)]
        left.bar(xs, medians, width, yerr=[low, high], capsize=2, color=colour, hatch=hatch, edgecolor="black",
                 linewidth=0.5, label=label)
    left.set_xticks(range(n), labels, rotation=10)
    left.set_ylabel("training step time (s)")
    left.set_title("step time (median; bars: min..max)")
    left.legend(fontsize=8)
    for i, r in enumerate(results):
        right.plot([i - 0.3, i + 0.3], [r["analytic_speedup"]] * 2, color="black", lw=2,
                   label="analytic (MAC ratio)" if i == 0 else None)
        right.plot([i - 0.3, i + 0.3], [0.9 * r["analytic_speedup"]] * 2, color="tab:red", ls="--",
                   label="target: 90% of analytic" if i == 0 else None)
        pairwise = [a / b for a, b in zip(r["baseline"]["cpu_times_s"], r["tread"]["cpu_times_s"])]
        right.scatter([i + 0.08] * len(pairwise), pairwise, color="tab:green", alpha=0.4, s=14,
                      label="per-repeat ratio, CPU time" if i == 0 else None)
        right.scatter([i - 0.08], [r["speedup"]], color="tab:blue", marker="D", s=45, zorder=3,
                      label="measured, wall (ratio of medians)" if i == 0 else None)
        right.scatter([i + 0.08], [r["speedup_cpu"]], color="tab:green", marker="s", s=45, zorder=3,
                      label="measured, CPU time (ratio of medians)" if i == 0 else None)
    right.set_xticks(range(n), labels, rotation=10)
    right.set_xlim(-0.6, n - 0.4)
    right.set_ylabel("TREAD speedup (no-routing time / TREAD time)")
    right.set_title("measured vs analytic speedup")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    right.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: list[dict], meta: dict, out_prefix: str | os.PathLike, plot: str | os.PathLike | None) -> dict:
    """``<out_prefix>.json`` (meta + results), ``<out_prefix>.md`` (the table) and the plot."""
    paths = write_report(out_prefix, "Step benchmark", meta, results, markdown_table(results))
    if plot and results:
        plot_step_benchmarks(results, plot)
        paths["plot"] = Path(plot)
    return paths
