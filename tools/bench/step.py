"""Training-step benchmark: TREAD against no routing, measured in the same process.

:func:`benchmark_step` times whole training steps of one model with and without its TREAD routes: the
trainer's step (:class:`ssm_tread.train.step.TrainStep`: forward, loss, backward, clipping, AdamW, the
schedule and the EMA) on a fixed random batch. Both modes share the model, its weights and its optimizer;
only the router object is swapped (:func:`routing_off`). After a warm-up of each mode the timed steps
alternate A B B A A B B A ... (A = no routing, B = TREAD), so slow drifts of a shared machine hit both
modes alike; the speedup is reported twice: the ratio of the two medians and the median of the
per-repeat ratios (each repeat's A and B ran next to each other).

Derived numbers (per mode): images/s = batch / median step time; analytic training TFLOP/s =
6 * forward MACs * images/s / 1e12 (forward 1x, backward 2x, 2 FLOP per MAC; the MACs of a TREAD step
are the routed forward's, :func:`ssm_tread.models.count_macs`); MFU = TFLOP/s / the device peak given.

Memory: on CUDA the allocator's peak of one step (``torch.cuda.max_memory_allocated``). A CPU has no
such counter, so there ``peak_memory_bytes`` is an estimate: parameters + gradients + AdamW state + the
fp32 EMA + the activations saved for backward (``activation_bytes``, measured on every device by
counting the distinct storages autograd saves during the forward).
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ssm_tread.diffusion import create_diffusion
from ssm_tread.models import count_macs, create_model
from ssm_tread.routing import TokenRouter
from ssm_tread.train.config import model_spec
from ssm_tread.train.ema import EMA
from ssm_tread.train.step import TrainStep, build_optimizer
from tools.bench.env import device_name, quantiles, synchronize, timed_both

MODES = ("baseline", "tread")  # A: no routing, B: the model's TREAD routes


@contextlib.contextmanager
def routing_off(model: nn.Module) -> Iterator[None]:
    """Train ``model`` without its routes: its router is swapped for one without routes, then restored."""
    routed = model.router
    model.router = TokenRouter(None, routed.depth, routed.scan_consistent)
    try:
        yield
    finally:
        model.router = routed


def mode(model: nn.Module, name: str):
    """``name`` "tread": the model as it is; "baseline": :func:`routing_off`."""
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose from {MODES}")
    return routing_off(model) if name == "baseline" else contextlib.nullcontext()


@dataclass
class StepSetup:
    """A model, the trainer's step for it and a fixed random batch: ``run()`` runs one training step."""

    cfg: dict
    model: nn.Module
    step: TrainStep
    batch: tuple  # (x [B, C, H, W], y [B], None, None): the objective draws noise and times
    device: torch.device

    @property
    def label(self) -> str:
        return self.cfg["_label"]

    @property
    def batch_size(self) -> int:
        return self.cfg["train"]["batch_size"]

    def loss(self) -> torch.Tensor:
        return self.step.loss(*self.batch)

    def run(self) -> float:
        loss, _ = self.step([self.batch])
        return float(loss)


def build_step(cfg: dict, device: torch.device | str = "cpu", seed: int = 0) -> StepSetup:
    """The model of a benchmark spec's config (:func:`tools.bench.specs.parse_spec`), with its EMA,
    AdamW and schedule as the trainer builds them, and a seeded random batch."""
    if cfg["train"]["precision"] not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {cfg['train']['precision']!r}")
    device, data = torch.device(device), cfg["_data"]
    torch.manual_seed(seed)
    name, kwargs = model_spec(cfg, data)
    model = create_model(name, **kwargs).to(device).train()
    if cfg["train"]["precision"] == "bf16" and device.type == "cuda":  # as the trainer's accelerator does
        model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)
    optimizer, scheduler = build_optimizer(model, cfg["optim"], cfg["train"]["steps"])
    diffusion = create_diffusion(cfg["diffusion"]["objective"], **cfg["diffusion"]["kwargs"])
    step = TrainStep(model, diffusion, optimizer, scheduler, EMA(model, cfg["train"]["ema_decay"]),
                     loss_type=cfg["routing"]["loss"], grad_clip=cfg["optim"]["grad_clip"])
    generator = torch.Generator().manual_seed(seed)
    batch = cfg["train"]["batch_size"]
    x = torch.randn(batch, data.channels, data.image_size, data.image_size, generator=generator)
    y = torch.randint(0, data.num_classes, (batch,), generator=generator)
    return StepSetup(cfg, model, step, (x.to(device), y.to(device), None, None), device)


def storage_id(tensor: torch.Tensor) -> int:
    """The identity of ``tensor``'s storage, shared by its views; unlike the data pointer it is distinct on
    the meta device too, where every storage's data pointer is 0."""
    return tensor.untyped_storage()._cdata


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs a forward
    (storages whose :func:`storage_id` is in ``exclude``, e.g. the parameters', are not counted). Works on
    the meta device, where it counts the bytes a real forward would save."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        try:
            key = storage_id(tensor)
            if key not in exclude:
                seen[key] = tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    del out
    return sum(seen.values())


def static_bytes(setup: StepSetup) -> int:
    """Parameters + gradients + AdamW's two moments + the fp32 EMA, in bytes (what lives across steps)."""
    params = list(setup.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    ema = sum(p.numel() * p.element_size() for p in setup.step.ema.model.parameters())
    return frozen + 4 * trainable + ema


def step_memory(setup: StepSetup) -> dict:
    """Memory of one step in the current mode: saved activations, and the peak (see the module doc)."""
    exclude = {storage_id(p) for p in setup.model.parameters()}
    activations = saved_activation_bytes(setup.loss, exclude)
    setup.step.optimizer.zero_grad(set_to_none=True)
    if setup.device.type == "cuda":
        synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        setup.run()
        synchronize(setup.device)
        return {"activation_bytes": activations, "peak_memory_bytes": torch.cuda.max_memory_allocated(setup.device),
                "peak_memory_source": "cuda allocator peak"}
    return {"activation_bytes": activations, "peak_memory_bytes": static_bytes(setup) + activations,
            "peak_memory_source": "estimate: params + grads + AdamW state + EMA + saved activations"}


def update_time(setup: StepSetup, repeats: int = 3) -> dict:
    """Median wall and CPU time of the update alone (clip, AdamW, schedule, EMA; gradients present): work
    that does not shrink with the tokens a step routes, so it bounds the speedup from below the MAC ratio."""
    times = []
    for _ in range(repeats):
        setup.step.backward([setup.batch])
        times.append(timed_both(setup.step.update, setup.device))
    return {"wall_s": statistics.median(w for w, _ in times), "cpu_s": statistics.median(c for _, c in times)}


def interleaved_order(repeats: int) -> list[str]:
    """A B B A A B B A ...: each mode runs first in half of the repeats."""
    order = []
    for r in range(repeats):
        order += list(MODES) if r % 2 == 0 else list(reversed(MODES))
    return order


def scan_backend_of(model: nn.Module, device: torch.device) -> str:
    """The selective-scan backend the model's Mamba mixers use on ``device``; "n/a" without mixers."""
    from ssm_tread.models.mamba import Mamba
    from ssm_tread.ops import active_backend

    if not any(isinstance(m, Mamba) for m in model.modules()):
        return "n/a (attention)"
    return active_backend(device)


def benchmark_step(cfg: dict, device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 5,
                   peak_tflops: float | None = None, seed: int = 0, memory: bool = True,
                   log: Callable[[str], None] | None = None, peak_tflops_cpu: float | None = None) -> dict:
    """Time training steps of a benchmark config with and without TREAD, interleaved (see the module doc).

    ``warmup`` untimed steps of each mode first; then ``repeats`` pairs of timed steps. Returns a
    JSON-ready dict: the config, MACs, per-mode step times (all, and median/quartiles), images/s,
    TFLOP/s, MFU (when ``peak_tflops`` is given), memory, and the speedups against the analytic ratio.
    On a CPU every time is also taken as this process's CPU time; ``tflops_cpu`` is the rate over the
    CPU time times the torch threads, compared with ``peak_tflops_cpu`` (default ``peak_tflops``).
    """
    device = torch.device(device)
    setup = build_step(cfg, device, seed)
    model, batch = setup.model, setup.batch_size
    macs = {"baseline": count_macs(model, routed=False), "tread": count_macs(model, routed=True)}
    params = sum(p.numel() for p in model.parameters())
    say = log or (lambda message: None)
    routes = [list(r) for r in cfg["routing"]["routes"]]
    say(f"{setup.label}: {params / 1e6:.2f}M params, {macs['baseline'] / 1e9:.3f} -> {macs['tread'] / 1e9:.3f} "
        f"GMACs/image, routes {routes}, batch {batch} on {device}")
    for name in MODES:
        with mode(model, name):
            for _ in range(warmup):
                setup.run()
    times: dict[str, list[float]] = {name: [] for name in MODES}
    cpu_times: dict[str, list[float]] = {name: [] for name in MODES}
    order = interleaved_order(repeats)
    for k, name in enumerate(order):
        with mode(model, name):
            wall, cpu = timed_both(setup.run, device)
        times[name].append(wall)
        cpu_times[name].append(cpu)
        if k % 2 == 1:
            say(f"  repeat {k // 2 + 1}/{repeats}: baseline {times['baseline'][-1]:.3f} s "
                f"(cpu {cpu_times['baseline'][-1]:.3f}), tread {times['tread'][-1]:.3f} s (cpu {cpu_times['tread'][-1]:.3f})")

    result = {"label": setup.label, "spec": {g: cfg[g] for g in ("model", "routing", "diffusion")}, "routes": routes,
              "device": str(device), "device_name": device_name(device), "torch_threads": torch.get_num_threads(),
              "scan_backend": scan_backend_of(model, device), "scan_consistent": model.router.scan_consistent,
              "params": params, "batch_size": batch, "precision": cfg["train"]["precision"], "warmup": warmup,
              "repeats": repeats, "order": "".join("A" if name == "baseline" else "B" for name in order),
              "macs_forward": macs, "analytic_speedup": macs["baseline"] / macs["tread"],
              "peak_tflops": peak_tflops, "peak_tflops_cpu": peak_tflops_cpu or peak_tflops}
    threads, peak_cpu = torch.get_num_threads(), result["peak_tflops_cpu"]
    for name in MODES:
        stats, cpu_stats = quantiles(times[name]), quantiles(cpu_times[name])
        images_per_s = batch / stats["median"]
        tflops = 6 * macs[name] * images_per_s / 1e12
        tflops_cpu = 6 * macs[name] * batch * threads / cpu_stats["median"] / 1e12 if device.type == "cpu" else None
        entry = {"step_times_s": times[name], "step_time_s": stats, "images_per_s": images_per_s,
                 "cpu_times_s": cpu_times[name], "cpu_time_s": cpu_stats,
                 "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
                 "tflops_cpu": tflops_cpu, "mfu_cpu": tflops_cpu / peak_cpu if tflops_cpu and peak_cpu else None}
        if memory:
            with mode(model, name):
                entry.update(step_memory(setup))
        result[name] = entry
    result["update_step"] = update_time(setup)
    result["speedup"] = result["baseline"]["step_time_s"]["median"] / result["tread"]["step_time_s"]["median"]
    result["speedup_pairwise"] = quantiles([a / b for a, b in zip(times["baseline"], times["tread"])])
    result["speedup_over_analytic"] = result["speedup"] / result["analytic_speedup"]
    result["pairwise_over_analytic"] = result["speedup_pairwise"]["median"] / result["analytic_speedup"]
    result["speedup_cpu"] = result["baseline"]["cpu_time_s"]["median"] / result["tread"]["cpu_time_s"]["median"]
    result["speedup_cpu_pairwise"] = quantiles([a / b for a, b in zip(cpu_times["baseline"], cpu_times["tread"])])
    result["cpu_speedup_over_analytic"] = result["speedup_cpu"] / result["analytic_speedup"]
    say(f"  speedup {result['speedup']:.3f} (pairwise median {result['speedup_pairwise']['median']:.3f}; "
        f"cpu time {result['speedup_cpu']:.3f}), analytic {result['analytic_speedup']:.3f}, "
        f"speedup / analytic {result['speedup_over_analytic']:.3f} (cpu time {result['cpu_speedup_over_analytic']:.3f})")
    return result
