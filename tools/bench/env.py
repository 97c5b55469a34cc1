"""The machine a benchmark ran on, how it is timed, and where its report goes."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def command_line() -> str:
    return "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "command": command_line(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_both(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of ``fn()``, CUDA work included. On a shared CPU
    the process time counts only the cycles this process got, so it is far less sensitive to other
    tenants (with one torch thread; with several, idle threads spinning at barriers count too)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def quantiles(values: list[float]) -> dict:
    """Median, quartiles, min and max."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def measure_matmul_tflops(device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32,
                          repeats: int = 5, warmup: int = 1) -> dict:
    """The best achieved dense matmul rate (TFLOP/s) of ``size`` x ``size`` operands: a practical peak
    for MFU where no datasheet figure is given. Returns {"wall": from wall-clock time, "cpu": from this
    process's CPU time times the torch threads (CPU only; None on CUDA)}: on a shared CPU the second is
    the rate the cores reach while this process has them. ``warmup`` untimed products come first (a GPU
    reaches its clocks and the library its kernel choice only after several)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        wall, cpu = timed_both(lambda: a @ b, device)
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    flop = 2 * size**3
    cpu_rate = flop * torch.get_num_threads() / best_cpu / 1e12 if device.type == "cpu" else None
    return {"wall": flop / best_wall / 1e12, "cpu": cpu_rate}


def write_report(out: str | os.PathLike, title: str, meta: dict, results: list, text: str) -> dict:
    """OUT.json (``meta`` and every result) and OUT.md (a header naming the machine and command, then ``text``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out.with_suffix(".json"), "md": out.with_suffix(".md")}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    header = f"{title}, {meta.get('date')}, {meta.get('device_name')}, torch {meta.get('torch')}\n\n"
    paths["md"].write_text(header + f"Command: `{meta.get('command', '')}`\n\n" + text)
    return paths
