"""Training-step and router benchmarks: TREAD against no routing, measured in the same process.

:func:`benchmark_step` times whole training steps (forward + backward + AdamW) of one model with and
without its TREAD routes. Both modes share the model, its weights and its optimizer; only the router
object is swapped (:func:`routing_off`). After a warm-up of each mode the timed steps alternate
A B B A A B B A ... (A = no routing, B = TREAD), so slow drifts of a shared machine hit both modes
alike; the speedup is reported twice: the ratio of the two medians and the median of the per-repeat
ratios (each repeat's A and B ran next to each other).

Derived numbers (per mode): images/s = batch / median step time; analytic training TFLOP/s =
6 * forward MACs * images/s / 1e12 (forward 1x, backward 2x, 2 FLOP per MAC; the MACs of a TREAD step
are the routed forward's, :func:`ssm_tread.models.count_macs`); MFU = TFLOP/s / the device peak given.

Memory: on CUDA the allocator's peak of one step (``torch.cuda.max_memory_allocated``). A CPU has no
such counter, so there ``peak_memory_bytes`` is an estimate: parameters + gradients + AdamW state +
the activations saved for backward (``activation_bytes``, measured on every device by counting the
distinct storages autograd saves during the forward).

:func:`router_overhead` times what the router itself does in a routed step (token selection, the
gather at each route start, the scatter at each route end, the restricted scan orders of scan layers
and the alignment of long skips), forward and backward, driven through the model's own routes, scan
orders and skips with identity blocks, and reports it as a share of the routed step.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ssm_tread.routing import TokenRouter, select_tokens

MODES = ("baseline", "tread")  # A: no routing, B: the model's TREAD routes


# --------------------------------------------------------------------------------------------------
# configurations


@dataclass
class StepConfig:
    """One model to benchmark.

    ``model``: a :func:`ssm_tread.models.create_model` name; ``kwargs``: its overrides (sizes,
    input_size, ...); ``routes``: TREAD routes as (start, end, ratio), or None for the paper's shape
    (start 2, end depth-4, ratio 0.5); ``objective``: the diffusion loss ("ddpm": hybrid loss with
    learned sigma when the model has it; "flow"); ``precision``: "fp32" or "bf16" (autocast, CUDA only).
    """

    label: str
    model: str
    kwargs: dict = field(default_factory=dict)
    routes: list | None = None
    batch_size: int = 2
    objective: str = "ddpm"
    precision: str = "fp32"


# Models of the CPU targets. DiT-B/2 is the paper's; the Mamba models are the smallest presets-alike
# with a 256-token (32x32x4, patch 2) latent and routes of the same shape (2 -> depth-4, ratio 0.5).
PRESETS: dict[str, StepConfig] = {
    "dit-b2": StepConfig("DiT-B/2", "DiT-B/2", {}, [(2, 8, 0.5)], batch_size=2),
    "zigma-s2": StepConfig("ZigMa-S/2", "ZigMa-S/2", {}, [(2, 20, 0.5)], batch_size=2),
    "dim-s2": StepConfig("DiM-S/2 (384 x 25)", "DiM", dict(hidden_size=384, depth=25, patch_size=2), [(2, 21, 0.5)],
                         batch_size=2),
    # tiny ones, for tests and smoke runs
    "dit-tiny": StepConfig("DiT-tiny", "DiT", dict(input_size=8, patch_size=2, hidden_size=32, depth=6, num_heads=2,
                                                   num_classes=10), None, batch_size=2),
    "zigma-tiny": StepConfig("ZigMa-tiny", "ZigMa", dict(input_size=8, patch_size=2, hidden_size=32, depth=6,
                                                         num_classes=10), None, batch_size=2),
    "dim-tiny": StepConfig("DiM-tiny", "DiM", dict(input_size=8, patch_size=2, hidden_size=32, depth=7,
                                                   num_classes=10), None, batch_size=2),
}

_CONFIG_KEYS = {"label", "model", "batch", "batch_size", "route", "routes", "objective", "precision"}


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_config(spec: str) -> StepConfig:
    """A preset name (:data:`PRESETS`) or ``key=value`` pairs separated by commas.

    Keys: ``model`` (required), ``label``, ``batch``, ``route=START:END:RATIO`` (several joined by
    ``;``; ``route=paper`` or no route: 2 -> depth-4 at 0.5), ``objective``, ``precision``; any other key
    is a model override, e.g. ``model=DiM,hidden_size=384,depth=25,patch_size=2,batch=2``.
    A preset can be changed the same way: ``dit-b2,batch=4``.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty benchmark config")
    if "=" not in parts[0]:
        if parts[0] not in PRESETS:
            raise ValueError(f"unknown preset {parts[0]!r}; presets: {', '.join(PRESETS)}; or give model=NAME,...")
        base = PRESETS[parts[0]]
        config = StepConfig(**{**asdict(base), "kwargs": dict(base.kwargs)})
        parts = parts[1:]
    else:
        config = None
    values: dict = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"benchmark config {spec!r}: {part!r} is not key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        values[key] = value
    if config is None:
        if "model" not in values:
            raise ValueError(f"benchmark config {spec!r}: give model=NAME or a preset ({', '.join(PRESETS)})")
        config = StepConfig(label=values.get("label", values["model"]), model=values["model"])
    for key, value in values.items():
        if key == "model":
            config.model = value
        elif key == "label":
            config.label = value
        elif key in ("batch", "batch_size"):
            config.batch_size = int(value)
        elif key in ("route", "routes"):
            config.routes = None if value == "paper" else [
                (int(a), int(b), float(c)) for a, b, c in (r.split(":") for r in value.split(";"))
            ]
        elif key in ("objective", "precision"):
            setattr(config, key, value)
        else:
            config.kwargs[key] = _literal(value)
    return config


def paper_routes(depth: int, ratio: float = 0.5) -> list[tuple[int, int, float]]:
    """The paper's placement: one route from block 2 to block depth-4."""
    return [(2, depth - 4, ratio)]


def resolve_routes(config: StepConfig) -> list[tuple[int, int, float]]:
    """The config's routes; None becomes the paper's shape for the model's depth."""
    if config.routes is not None:
        return [tuple(r) for r in config.routes]
    from ssm_tread.models import create_model

    with torch.device("meta"):
        model = create_model(config.model, **config.kwargs)
    return paper_routes(model.router.depth)


# --------------------------------------------------------------------------------------------------
# environment


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
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32,
                          repeats: int = 5) -> dict:
    """The best achieved dense matmul rate (TFLOP/s) of ``size`` x ``size`` operands: a practical peak
    for MFU where no datasheet figure is given. Returns {"wall": from wall-clock time, "cpu": from this
    process's CPU time times the torch threads (CPU only; None on CUDA)}: on a shared CPU the second is
    the rate the cores reach while this process has them."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        wall, cpu = timed_both(lambda: a @ b, torch.device(device))
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    flop = 2 * size**3
    cpu_rate = flop * torch.get_num_threads() / best_cpu / 1e12 if torch.device(device).type == "cpu" else None
    return {"wall": flop / best_wall / 1e12, "cpu": cpu_rate}


# --------------------------------------------------------------------------------------------------
# one training step


@contextlib.contextmanager
def routing_off(model: nn.Module) -> Iterator[None]:
    """Train ``model`` without its routes: its router is swapped for one without routes, then restored."""
    routed = model.router
    model.router = TokenRouter(None, routed.depth, routed.scan_consistent)
    try:
        yield
    finally:
        model.router = routed


@contextlib.contextmanager
def mode(model: nn.Module, name: str) -> Iterator[None]:
    """``name`` "tread": the model as it is; "baseline": :func:`routing_off`."""
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose from {MODES}")
    with routing_off(model) if name == "baseline" else contextlib.nullcontext():
        yield


@dataclass
class StepSetup:
    """A model with its optimizer, diffusion and a fixed batch: ``step()`` runs one training step."""

    config: StepConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    diffusion: object
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    routes: list

    def autocast(self):
        if self.config.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return self.diffusion.training_losses(self.model, self.x, {"y": self.y})["loss"].mean()

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def build_step(config: StepConfig, device: torch.device | str = "cpu", seed: int = 0) -> StepSetup:
    """The model of ``config`` with its routes, AdamW (lr 1e-4), the diffusion loss and a random batch."""
    from ssm_tread.diffusion import create_diffusion
    from ssm_tread.models import create_model

    if config.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")
    device = torch.device(device)
    routes = resolve_routes(config)
    torch.manual_seed(seed)
    model = create_model(config.model, routes=[list(r) for r in routes], **config.kwargs).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = create_diffusion(config.objective)
    height = width = model.input_size if isinstance(model.input_size, int) else None
    if height is None:
        height, width = model.input_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(config.batch_size, model.in_channels, height, width, generator=generator).to(device)
    y = torch.randint(0, model.num_classes, (config.batch_size,), generator=generator).to(device)
    return StepSetup(config, model, optimizer, diffusion, x, y, device, routes)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()`` (CUDA work included)."""
    return timed_both(fn, device)[0]


def timed_both(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of ``fn()``. On a shared CPU the process time
    counts only the cycles this process got, so it is far less sensitive to other tenants (with one
    torch thread; with several, idle threads spinning at barriers count too)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs a forward
    (storages whose data pointer is in ``exclude``, e.g. the parameters, are not counted)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        try:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in exclude:
                seen[pointer] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    del out
    return sum(seen.values())


def static_bytes(setup: StepSetup) -> int:
    """Parameters + gradients + AdamW's two moments, in bytes (what lives across steps)."""
    trainable = sum(p.numel() * p.element_size() for p in setup.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in setup.model.parameters() if not p.requires_grad)
    return frozen + 4 * trainable


def step_memory(setup: StepSetup) -> dict:
    """Memory of one step in the current mode: saved activations, and the peak (see the module doc)."""
    exclude = {p.untyped_storage().data_ptr() for p in setup.model.parameters()}
    activations = saved_activation_bytes(setup.loss, exclude)
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.device.type == "cuda":
        synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        setup.step()
        synchronize(setup.device)
        return {"activation_bytes": activations, "peak_memory_bytes": torch.cuda.max_memory_allocated(setup.device),
                "peak_memory_source": "cuda allocator peak"}
    return {"activation_bytes": activations, "peak_memory_bytes": static_bytes(setup) + activations,
            "peak_memory_source": "estimate: params + grads + AdamW state + saved activations"}


def optimizer_step_time(setup: StepSetup, repeats: int = 3) -> dict:
    """Median wall and CPU time of the AdamW update alone (gradients present): work that does not shrink
    with the tokens a step routes, so it bounds the speedup from below the MAC ratio."""
    setup.loss().backward()
    both = [timed_both(setup.optimizer.step, setup.device) for _ in range(repeats)]
    setup.optimizer.zero_grad(set_to_none=True)
    return {"wall_s": statistics.median(w for w, _ in both), "cpu_s": statistics.median(c for _, c in both)}


def interleaved_order(repeats: int) -> list[str]:
    """A B B A A B B A ...: each mode runs first in half of the repeats."""
    order = []
    for r in range(repeats):
        order += list(MODES) if r % 2 == 0 else list(reversed(MODES))
    return order


def scan_backend_of(model: nn.Module, device: torch.device) -> str:
    """The selective-scan backend the model's Mamba mixers use on ``device``; "n/a" without mixers."""
    from ssm_tread.models.mamba import Mamba

    if not any(isinstance(m, Mamba) for m in model.modules()):
        return "n/a (attention)"
    from ssm_tread.ops import active_backend

    return active_backend(device)


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def benchmark_step(
    config: StepConfig,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    peak_tflops: float | None = None,
    seed: int = 0,
    memory: bool = True,
    log: Callable[[str], None] | None = None,
    peak_tflops_cpu: float | None = None,
) -> dict:
    """Time training steps of ``config`` with and without TREAD, interleaved (see the module doc).

    ``warmup`` untimed steps of each mode first; then ``repeats`` pairs of timed steps. Returns a
    JSON-ready dict: the config, MACs, per-mode step times (all, and median/quartiles), images/s,
    TFLOP/s, MFU (when ``peak_tflops`` is given), memory, and the speedups against the analytic ratio.

    On a CPU every time is also taken as this process's CPU time; ``tflops_cpu`` is the rate over the
    CPU time divided by the torch threads, compared with ``peak_tflops_cpu`` (default ``peak_tflops``).
    """
    from ssm_tread.models import count_macs

    device = torch.device(device)
    setup = build_step(config, device, seed)
    model = setup.model
    macs = {"baseline": count_macs(model, routed=False), "tread": count_macs(model, routed=True)}
    params = sum(p.numel() for p in model.parameters())
    say = log or (lambda message: None)
    say(f"{config.label}: {params / 1e6:.2f}M params, {macs['baseline'] / 1e9:.3f} -> {macs['tread'] / 1e9:.3f} "
        f"GMACs/image, routes {setup.routes}, batch {config.batch_size} on {device}")

    for name in MODES:
        with mode(model, name):
            for _ in range(warmup):
                setup.step()
    times: dict[str, list[float]] = {name: [] for name in MODES}
    cpu_times: dict[str, list[float]] = {name: [] for name in MODES}
    order = interleaved_order(repeats)
    for k, name in enumerate(order):
        with mode(model, name):
            wall, cpu = timed_both(setup.step, device)
        times[name].append(wall)
        cpu_times[name].append(cpu)
        if k % 2 == 1:
            say(f"  repeat {k // 2 + 1}/{repeats}: baseline {times['baseline'][-1]:.3f} s "
                f"(cpu {cpu_times['baseline'][-1]:.3f}), tread {times['tread'][-1]:.3f} s (cpu {cpu_times['tread'][-1]:.3f})")

    result = {
        "label": config.label,
        "config": asdict(config),
        "routes": [list(r) for r in setup.routes],
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "scan_backend": scan_backend_of(model, device),
        "scan_consistent": model.router.scan_consistent,
        "params": params,
        "batch_size": config.batch_size,
        "warmup": warmup,
        "repeats": repeats,
        "order": "".join("A" if name == "baseline" else "B" for name in order),
        "macs_forward": macs,
        "analytic_speedup": macs["baseline"] / macs["tread"],
        "peak_tflops": peak_tflops,
        "peak_tflops_cpu": peak_tflops_cpu or peak_tflops,
    }
    threads = torch.get_num_threads()
    peak_cpu = result["peak_tflops_cpu"]
    for name in MODES:
        stats = _quantiles(times[name])
        images_per_s = config.batch_size / stats["median"]
        tflops = 6 * macs[name] * images_per_s / 1e12
        cpu_stats = _quantiles(cpu_times[name])
        tflops_cpu = None
        if device.type == "cpu":
            tflops_cpu = 6 * macs[name] * config.batch_size * threads / cpu_stats["median"] / 1e12
        entry = {"step_times_s": times[name], "step_time_s": stats, "images_per_s": images_per_s,
                 "cpu_times_s": cpu_times[name], "cpu_time_s": cpu_stats,
                 "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
                 "tflops_cpu": tflops_cpu, "mfu_cpu": tflops_cpu / peak_cpu if tflops_cpu and peak_cpu else None}
        if memory:
            with mode(model, name):
                entry.update(step_memory(setup))
        result[name] = entry
    result["optimizer_step"] = optimizer_step_time(setup)
    pairwise = [a / b for a, b in zip(times["baseline"], times["tread"])]
    result["speedup"] = result["baseline"]["step_time_s"]["median"] / result["tread"]["step_time_s"]["median"]
    result["speedup_pairwise"] = _quantiles(pairwise)
    result["speedup_over_analytic"] = result["speedup"] / result["analytic_speedup"]
    result["pairwise_over_analytic"] = result["speedup_pairwise"]["median"] / result["analytic_speedup"]
    result["speedup_cpu"] = result["baseline"]["cpu_time_s"]["median"] / result["tread"]["cpu_time_s"]["median"]
    result["speedup_cpu_pairwise"] = _quantiles([a / b for a, b in zip(cpu_times["baseline"], cpu_times["tread"])])
    result["cpu_speedup_over_analytic"] = result["speedup_cpu"] / result["analytic_speedup"]
    say(f"  speedup {result['speedup']:.3f} (pairwise median {result['speedup_pairwise']['median']:.3f}; "
        f"cpu time {result['speedup_cpu']:.3f}), analytic {result['analytic_speedup']:.3f}, "
        f"speedup / analytic {result['speedup_over_analytic']:.3f} (cpu time {result['cpu_speedup_over_analytic']:.3f})")
    return result


# --------------------------------------------------------------------------------------------------
# the router's own cost


def router_layout(model: nn.Module) -> dict:
    """What the model's forward hands the router: sequence length L, width D, the routable positions
    (None: all), each block's scan order (None for attention) and which blocks fuse and store a long skip."""
    length = getattr(model, "seq_len", model.pos_embed.shape[1])  # DiM: prefix and padded grid
    hidden = getattr(model, "stream_width", model.pos_embed.shape[2])  # ZigMa routes its pair [h | r]: 2D
    routable = getattr(model, "grid_positions", None)
    if routable is not None and routable.numel() == length:
        routable = None  # every token is routable (ZigMa): the model calls begin() without positions
    orders = None
    if hasattr(model, "scan_orders"):
        orders = [model.scan_orders[row] for row in model.block_scan]
    skips = [getattr(block, "skip_linear", None) is not None for block in model.blocks]
    stores = getattr(model, "stores_skip", [False] * len(model.blocks))
    return {"length": length, "hidden": hidden, "routable": routable, "orders": orders, "skips": skips,
            "stores": stores, "depth": len(model.blocks)}


def _router_pass(router: TokenRouter, layout: dict, x: torch.Tensor) -> torch.Tensor:
    """The model's block loop with identity blocks: only the router's work (and, for scan models, the
    permutations into each routed block's restricted order and back) remains. Returns the output."""
    routing = router.begin(routable=layout["routable"], training=True)
    depth, orders, skips, stores = layout["depth"], layout["orders"], layout["skips"], layout["stores"]
    skip_stack = []
    h = x
    for i in range(depth):
        h = routing.enter(i, h)
        if skips[i]:
            skip, tag = skip_stack.pop()
            h = h + routing.align(skip, tag)
        if orders is not None and routing.routed:
            scan = routing.scan(orders[i])
            h = scan.restore(scan.apply(h))
        h = routing.exit(i, h)
        if stores[i]:
            skip_stack.append((h, routing.tag()))
    return h


def router_overhead(
    setup: StepSetup,
    routed_step_s: float,
    repeats: int = 20,
    warmup: int = 3,
    routed_step_cpu_s: float | None = None,
) -> dict:
    """Median time of the router's work in one routed step (forward + backward), alone and by part,
    as a share of ``routed_step_s`` (the median routed training step, wall clock) and of
    ``routed_step_cpu_s`` (its CPU time, when given; the parts' CPU times are measured alike).

    Parts: "select" (each route's random subset: :func:`select_tokens` and the routable-position
    lookup), "gather" and "scatter" (forward + backward, at the model's batch, length and width),
    "scan_orders" (for scan models: each distinct restricted order of a route, and reading every
    routed block's tokens in it and back, forward + backward), "total" (the whole routed block loop
    with identity blocks, including skip alignment; what the share is computed from).
    """
    model, device = setup.model, setup.device
    layout = router_layout(model)
    batch = setup.config.batch_size
    router = model.router
    x = torch.randn(batch, layout["length"], layout["hidden"], device=device, requires_grad=True)

    def total():
        _router_pass(router, layout, x).sum().backward()
        x.grad = None

    routable = layout["routable"] if layout["routable"] is not None else torch.arange(layout["length"], device=device)
    route = router.routes[0]
    probe = router.begin(routable=layout["routable"], training=True)
    with torch.no_grad():
        probe.enter(route.start, x)
    keep = probe.current.keep  # [B, K]: the kept positions as the model's first route has them
    kept_x = torch.randn(batch, keep.shape[1], layout["hidden"], device=device, requires_grad=True)

    def select():
        for r in router.routes:
            routable[select_tokens(batch, routable.numel(), r.num_kept(routable.numel()), device, router.generator)]

    def gather():
        for _ in router.routes:
            x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])).sum().backward()
        x.grad = None

    def scatter():
        for _ in router.routes:
            index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x.scatter(1, index, kept_x).sum().backward()
        x.grad = None
        kept_x.grad = None

    def scan_orders():
        from ssm_tread.routing import ScanIndex, scan_permutation

        for r in router.routes:
            cache = {}
            h = kept_x
            for i in range(r.start, r.end + 1):
                order = layout["orders"][i]
                key = order.data_ptr()
                if key not in cache:
                    cache[key] = ScanIndex(scan_permutation(order, keep))
                h = cache[key].restore(cache[key].apply(h))
            h.sum().backward()
        kept_x.grad = None

    parts = {"select": select, "gather": gather, "scatter": scatter, "total": total}
    if layout["orders"] is not None and router.scan_consistent:
        parts["scan_orders"] = scan_orders
    result, cpu_result = {}, {}
    for name, fn in parts.items():
        for _ in range(warmup):
            fn()
        both = [timed_both(fn, device) for _ in range(repeats)]
        result[name] = _quantiles([wall for wall, _ in both])
        cpu_result[name] = _quantiles([cpu for _, cpu in both])
    share = {name: result[name]["median"] / routed_step_s for name in result}
    out = {"times_s": result, "cpu_times_s": cpu_result, "share_of_step": share, "routed_step_s": routed_step_s,
           "overhead_share": share["total"], "repeats": repeats,
           "length": layout["length"], "kept": int(keep.shape[1]), "batch_size": batch}
    if routed_step_cpu_s:
        out["routed_step_cpu_s"] = routed_step_cpu_s
        out["share_of_step_cpu"] = {name: cpu_result[name]["median"] / routed_step_cpu_s for name in cpu_result}
        out["overhead_share_cpu"] = out["share_of_step_cpu"]["total"]
    return out


# --------------------------------------------------------------------------------------------------
# the whole run: several configs, Markdown, JSON, plot


def run_step_benchmarks(
    configs: list[StepConfig],
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    peak_tflops: float | None = None,
    router: bool = True,
    router_repeats: int = 20,
    log: Callable[[str], None] | None = print,
    on_result: Callable[[dict], None] | None = None,
    peak_tflops_cpu: float | None = None,
) -> list[dict]:
    """:func:`benchmark_step` (and :func:`router_overhead`) for every config, one after the other."""
    device = torch.device(device)
    results = []
    for config in configs:
        result = benchmark_step(config, device, warmup=warmup, repeats=repeats, peak_tflops=peak_tflops, log=log,
                                peak_tflops_cpu=peak_tflops_cpu)
        if router:
            setup = build_step(config, device)
            result["router"] = router_overhead(setup, result["tread"]["step_time_s"]["median"], repeats=router_repeats,
                                               routed_step_cpu_s=result["tread"]["cpu_time_s"]["median"])
            if log:
                log(f"  router overhead {100 * result['router']['overhead_share']:.2f}% of the routed step "
                    f"(cpu time {100 * result['router'].get('overhead_share_cpu', float('nan')):.2f}%)")
            del setup
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


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
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_prefix.with_suffix(".json"), "md": out_prefix.with_suffix(".md")}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    header = (f"Step benchmark, {meta.get('date')}, {meta.get('device_name')}, torch {meta.get('torch')}\n\n"
              f"Command: `{meta.get('command', '')}`\n\n")
    paths["md"].write_text(header + markdown_table(results))
    if plot and results:
        plot_step_benchmarks(results, plot)
        paths["plot"] = Path(plot)
    return paths


def benchmark_router(
    config: StepConfig,
    device: torch.device | str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    repeats: int = 20,
    log: Callable[[str], None] | None = None,
) -> dict:
    """:func:`router_overhead` on its own: the routed step time it is compared with is the median of
    ``steps`` routed training steps timed here (after ``warmup``)."""
    device = torch.device(device)
    setup = build_step(config, device)
    for _ in range(warmup):
        setup.step()
    both = [timed_both(setup.step, device) for _ in range(steps)]
    wall = statistics.median(w for w, _ in both)
    cpu = statistics.median(c for _, c in both)
    result = {"label": config.label, "config": asdict(config), "routes": [list(r) for r in setup.routes],
              "device": str(device), "scan_backend": scan_backend_of(setup.model, device),
              "router": router_overhead(setup, wall, repeats=repeats, routed_step_cpu_s=cpu)}
    if log:
        log(f"{config.label}: router {1e3 * result['router']['times_s']['total']['median']:.2f} ms of a "
            f"{1e3 * wall:.1f} ms routed step: {100 * result['router']['overhead_share']:.2f}% "
            f"(cpu time {100 * result['router']['overhead_share_cpu']:.2f}%)")
    return result


def router_table(results: list[dict]) -> str:
    """Markdown table of router overheads (the parts in CPU time on a CPU, wall-clock on CUDA)."""
    lines = ["| config | tokens (kept) | select | gather | scatter | scan orders | router total "
             "| routed step | router share (wall) | **router share (CPU time)** |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o = r["router"]
        cpu = "cpu_times_s" in o and not r["device"].startswith("cuda")
        parts = o["cpu_times_s"] if cpu else o["times_s"]
        step_s = o.get("routed_step_cpu_s") if cpu else o["routed_step_s"]
        ms = {k: f"{1e3 * v['median']:.2f} ms" for k, v in parts.items()}
        lines.append(
            f"| {r['label']} | {o['length']} ({o['kept']}) | {ms['select']} | {ms['gather']} | {ms['scatter']} "
            f"| {ms.get('scan_orders', '-')} | {ms['total']} | {1e3 * step_s:.1f} ms "
            f"| {_pct(o['overhead_share'])} | **{_pct(o.get('overhead_share_cpu'))}** |"
        )
    return "\n".join(lines) + "\n"


def profile_step(config: StepConfig, device: torch.device | str = "cpu", warmup: int = 1, top: int = 15,
                 rounds: int = 3) -> dict:
    """Where a step's time goes in each mode: torch.profiler's self time per operator of training steps
    without and with TREAD, ``rounds`` times A B (after ``warmup`` steps of each); per operator the
    median over rounds, so that one step slowed by another tenant does not decide. Returns {"ops": rows
    sorted by the no-routing time, each {"op", "baseline_ms", "tread_ms", "ratio"}, "total": the same
    summed over every operator}; ``ratio`` = baseline / TREAD, to compare with the analytic MAC ratio."""
    from torch.profiler import ProfilerActivity, profile

    from ssm_tread.models import count_macs

    device = torch.device(device)
    setup = build_step(config, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in MODES:
        with mode(setup.model, name):
            for _ in range(warmup):
                setup.step()
    samples: dict[str, dict[str, list[float]]] = {}  # op -> mode -> ms per round
    totals: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(rounds):
        for name in MODES:
            with mode(setup.model, name):
                with profile(activities=activities) as prof:
                    setup.step()
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
    return {"label": config.label, "rounds": rounds, "ops": rows[:top],
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
