"""What the router itself costs in a routed training step, measured through the model's own forward.

The model's blocks run :func:`identity_forward` instead of their own (:func:`identity_blocks`), so a forward does
everything but the blocks' work: the embeddings and the final layer, and in a routed pass also the
router's work (token selection, the gather at each route start, the scatter at each route end, the
alignment of long skips, and for scan layers the restricted scan orders and reading the tokens in them).
The router's cost is the difference between the routed and the unrouted forward + backward of that
model. Its parts are timed in the routed forward by wrapping the routing pass's methods: ``enter``
(selection and gather), ``exit`` (scatter), ``scan`` (restricted orders), ``align`` (skips).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ssm_tread.routing import ScanIndex
from tools.bench.env import quantiles, synchronize, timed_both
from tools.bench.step import build_step, routing_off, scan_backend_of

PARTS = ("enter", "exit", "scan", "align")


def identity_forward(x: torch.Tensor, *args) -> torch.Tensor:
    """Stands in for any block's forward: the tokens unchanged, read through the scan order the block is
    given (``scan.restore(scan.apply(x))``) and with a long skip of the same shape added."""
    for arg in args:
        if isinstance(arg, ScanIndex):
            x = arg.restore(arg.apply(x))
        elif isinstance(arg, torch.Tensor) and arg.shape == x.shape:
            x = x + arg
    return x


@contextlib.contextmanager
def identity_blocks(model: nn.Module) -> Iterator[None]:
    """Every block of ``model.blocks`` runs :func:`identity_forward` (the blocks, their attributes and the
    model's own forward stay as they are), then its own forward again."""
    for block in model.blocks:
        block.forward = identity_forward
    try:
        yield
    finally:
        for block in model.blocks:
            del block.forward


@contextlib.contextmanager
def timed_routing(model: nn.Module, device: torch.device, totals: dict) -> Iterator[list]:
    """Every routing pass the model begins gets its :data:`PARTS` timed (wall-clock seconds added to
    ``totals``); yields the list of passes begun."""
    router, passes = model.router, []
    begin = router.begin

    def timed_method(method: Callable, name: str) -> Callable:
        def run(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            synchronize(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return out
        return run

    def spy(*args, **kwargs):
        routing = begin(*args, **kwargs)
        for name in PARTS:
            setattr(routing, name, timed_method(getattr(routing, name), name))
        passes.append(routing)
        return routing

    router.begin = spy
    try:
        yield passes
    finally:
        del router.begin


def router_overhead(setup, routed_step_s: float, repeats: int = 20, warmup: int = 3,
                    routed_step_cpu_s: float | None = None) -> dict:
    """The router's time in one routed step (forward + backward; see the module doc), as a share of
    ``routed_step_s`` (the median routed training step, wall clock) and of ``routed_step_cpu_s`` (its
    CPU time, when given), with the forward time of each routing part."""
    model, device = setup.model, setup.device
    diffusion, (x, y, _, _) = setup.step.diffusion, setup.batch

    def forward_backward():
        setup.step.loss(x, y).backward()

    with identity_blocks(model):
        samples = {"routed": [], "unrouted": []}
        for k in range(warmup + repeats):
            for name in ("routed", "unrouted") if k % 2 == 0 else ("unrouted", "routed"):
                with routing_off(model) if name == "unrouted" else contextlib.nullcontext():
                    both = timed_both(forward_backward, device)
                if k >= warmup:
                    samples[name].append(both)
        parts: dict = {}
        with timed_routing(model, device, parts) as passes, torch.no_grad():
            for _ in range(repeats):
                diffusion.training_losses(model, x, {"y": y})
        masks = passes[-1].kept_masks()
    model.zero_grad(set_to_none=True)
    wall = [r[0] - u[0] for r, u in zip(samples["routed"], samples["unrouted"])]
    cpu = [r[1] - u[1] for r, u in zip(samples["routed"], samples["unrouted"])]
    out = {"times_s": {"total": quantiles(wall)}, "cpu_times_s": {"total": quantiles(cpu)},
           "forward_parts_s": {name: seconds / repeats for name, seconds in parts.items()},
           "routed_step_s": routed_step_s, "overhead_share": statistics.median(wall) / routed_step_s,
           "repeats": repeats, "length": masks[0].shape[1], "kept": int(masks[0][0].sum()),
           "batch_size": x.shape[0]}
    if routed_step_cpu_s:
        out["routed_step_cpu_s"] = routed_step_cpu_s
        out["overhead_share_cpu"] = statistics.median(cpu) / routed_step_cpu_s
    return out


def benchmark_router(cfg: dict, device: torch.device | str = "cpu", steps: int = 3, warmup: int = 1,
                     repeats: int = 20, log: Callable[[str], None] | None = None) -> dict:
    """:func:`router_overhead` on its own: the routed step time it is compared with is the median of
    ``steps`` routed training steps timed here (after ``warmup``)."""
    device = torch.device(device)
    setup = build_step(cfg, device)
    for _ in range(warmup):
        setup.run()
    both = [timed_both(setup.run, device) for _ in range(steps)]
    wall, cpu = statistics.median(w for w, _ in both), statistics.median(c for _, c in both)
    result = {"label": setup.label, "routes": [list(r) for r in cfg["routing"]["routes"]], "device": str(device),
              "scan_backend": scan_backend_of(setup.model, device),
              "router": router_overhead(setup, wall, repeats=repeats, routed_step_cpu_s=cpu)}
    if log:
        o = result["router"]
        log(f"{setup.label}: router {1e3 * o['times_s']['total']['median']:.2f} ms of a {1e3 * wall:.1f} ms "
            f"routed step: {100 * o['overhead_share']:.2f}% (cpu time {100 * o['overhead_share_cpu']:.2f}%)")
    return result


def router_table(results: list[dict]) -> str:
    """Markdown table of router overheads (CPU time on a CPU, wall clock on CUDA; the parts: forward only)."""
    lines = ["| config | tokens (kept) | enter (select + gather) fwd | exit (scatter) fwd | scan orders fwd "
             "| skips fwd | router total, fwd + bwd | routed step | router share (wall) "
             "| **router share (CPU time)** |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o = r["router"]
        cpu = "cpu_times_s" in o and not r["device"].startswith("cuda")
        total = (o["cpu_times_s"] if cpu else o["times_s"])["total"]["median"]
        step_s = o.get("routed_step_cpu_s") if cpu else o["routed_step_s"]
        ms = {k: f"{1e3 * o['forward_parts_s'][k]:.2f} ms" if k in o["forward_parts_s"] else "-" for k in PARTS}
        share_cpu = "-" if o.get("overhead_share_cpu") is None else f"{100 * o['overhead_share_cpu']:.2f}%"
        lines.append(f"| {r['label']} | {o['length']} ({o['kept']}) | {ms['enter']} | {ms['exit']} | {ms['scan']} "
                     f"| {ms['align']} | {1e3 * total:.2f} ms | {1e3 * step_s:.1f} ms "
                     f"| {100 * o['overhead_share']:.2f}% | **{share_cpu}** |")
    return "\n".join(lines) + "\n"

