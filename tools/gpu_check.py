"""The GPU check: one command that tells whether ssm_tread's GPU path works and is fast on this machine.

    python tools/gpu_check.py --out gpu_check          # one H100/H200; needs only torch, triton, einops
    python tools/gpu_check.py --dry-run --out /tmp/gc  # the same code on CPU at toy sizes (CI runs this)

Parts, each with its own time budget inside a total one (``--budget-s``, 450 s by default, so that the
whole check ends within 8 minutes on an H200, compilation included). A part that fails or runs out of
time keeps the rows it measured, does not stop the others, and the report is rewritten after every
part; a CUDA error that leaves the device unusable skips the parts after it, saying why.

  environment: device, versions, the scan and conv backends in use, TF32 (on, as in training), and the
     datasheet's dense bf16 peak where the device is known;
  matmul_peak: the best bf16 matmul rate reached here, after a warm-up;
  scan_parity: the triton and torch selective-scan backends against the reference loop: output, last
     state and every gradient, for fp32 and bf16 contiguous inputs and for bf16 inputs laid out as the
     Mamba mixer passes them in training (dt and z strided views);
  scan_speed: forward and backward times of each backend at the DiM-L/2 and ZigMa-B/2 mixer layers
     (batch 32, E = 2D, N = 16, L = 366 and 256, bf16, the mixer's layout), with the Triton kernels'
     estimate and roofline from their compiled code (tools/bench/kernels.py) where it can be computed;
  training: steps of DiT-XL/2, DiM-L/2 and ZigMa-B/2 in bf16 at batch 32, without and with TREAD (one
     route from block 2 to depth - 4, ratio 0.5): images/s, peak memory, TFLOP/s from ``count_macs``, MFU
     against the measured peak and against the datasheet's, measured vs analytic TREAD speedup;
  sampling: a classifier-free-guided DDIM pass at 256 tokens per backbone;
  torch_compile: DiT-XL/2 training steps under ``torch.compile``.

No data, VAE, diffusers, tqdm or download is needed. Writes DIR/gpu_check.json and DIR/gpu_check.md and
prints the Markdown. Targets: DiT-XL/2 bf16 MFU >= 45% of the measured peak; TREAD >= 90% of its
analytic speedup on every backbone; the triton scan >= 5x the torch scan.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ssm_tread import diffusion as ssm_diffusion  # noqa: E402
from ssm_tread import models  # noqa: E402
from ssm_tread.ops import active_backend, allow_tf32, selective_scan  # noqa: E402
from ssm_tread.ops.causal_conv import causal_conv1d_kernel  # noqa: E402
from ssm_tread.ops.selective_scan import check_backend  # noqa: E402
from ssm_tread.ops.triton_scan import interpreted  # noqa: E402
from ssm_tread.train.step import TrainStep  # noqa: E402
from tools.bench.env import device_name, measure_matmul_tflops, synchronize  # noqa: E402
from tools.bench.scan import scan_inputs, time_passes  # noqa: E402

BACKBONES = ("DiT-XL/2", "DiM-L/2", "ZigMa-B/2")
TARGETS = {"dit_mfu": 0.45, "tread_efficiency": 0.90, "triton_over_torch": 5.0}
TOTAL_BUDGET_S = 450
BUDGET_S = dict(environment=30, matmul_peak=30, scan_parity=90, scan_speed=90, training=150, sampling=60,
                torch_compile=150)
PARTS = tuple(BUDGET_S)
# dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s), matched in order against the device name
DATASHEET_BF16_TFLOPS = (("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
                         ("A100", 312.0))


def sizes(dry_run: bool) -> dict:
    """Every size the check uses: the real ones, or toy ones for a CPU dry run."""
    if not dry_run:
        return dict(
            batch=32, overrides={}, parity=(2, 64, 16, 300), scan_state=16,  # parity: batch, E, N, L
            scan_shapes={"DiM-L/2": (2048, 366), "ZigMa-B/2": (1536, 256)}, scan_warmup=3, scan_repeats=10,
            warmup=3, steps=10, sample_steps=25, matmul=8192, matmul_warmup=20, matmul_repeats=20,
            compile_backend="inductor",
        )
    toy = dict(hidden_size=32, depth=9, input_size=8)  # DiM needs an odd depth; the route runs 2 -> 5
    return dict(
        batch=2, overrides={"DiT-XL/2": {**toy, "num_heads": 2}, "DiM-L/2": toy, "ZigMa-B/2": toy},
        parity=(1, 8, 4, 40), scan_state=4, scan_shapes={"DiM-L/2": (8, 23), "ZigMa-B/2": (8, 16)},
        scan_warmup=0, scan_repeats=1, warmup=1, steps=2, sample_steps=2, matmul=256, matmul_warmup=1,
        matmul_repeats=2, compile_backend="eager",
    )


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on CPU (the dry run) float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------------
# the parts: each appends its rows to ``rows`` as it measures them (a part cut short keeps them) and
# returns the report's other fields


def environment(device: torch.device, rows: list) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = device_name(device)
    datasheet = next((tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in name), None)
    if device.type == "cuda":
        allow_tf32()  # as the trainer does with train.tf32 (the default)
    rows.append(dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device_name=name,
        torch=torch.__version__, triton=triton_version, python=platform.python_version(), cuda=torch.version.cuda,
        scan_backend=active_backend(device), causal_conv1d_kernel=causal_conv1d_kernel() is not None,
        tf32=torch.backends.cuda.matmul.allow_tf32, datasheet_bf16_tflops=datasheet,
    ))
    return {}


def matmul_peak(device: torch.device, cfg: dict, rows: list) -> dict:
    """The best dense matmul rate reached here (bf16 on CUDA, fp32 on CPU): the peak that MFU divides by."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = measure_matmul_tflops(device, cfg["matmul"], dtype, repeats=cfg["matmul_repeats"],
                                 warmup=cfg["matmul_warmup"])["wall"]
    rows.append(dict(size=cfg["matmul"], dtype=str(dtype).replace("torch.", ""), tflops=rate))
    return {}


PARITY_CASES = (("float32", "contiguous", 1e-3), ("bfloat16", "contiguous", 3e-2), ("bfloat16", "mixer", 3e-2))


def scan_parity(device: torch.device, cfg: dict, rows: list) -> dict:
    backends = ["torch"] + ["triton"] * usable("triton", device)
    batch, channels, state, length = cfg["parity"]
    for dtype_name, layout, tolerance in PARITY_CASES:
        inputs = scan_inputs(batch, channels, state, length, device, dtype=getattr(torch, dtype_name), layout=layout)
        expected = scan_outputs({k: v.detach().float() for k, v in inputs.items()}, "reference")
        for backend in backends:
            actual = scan_outputs(inputs, backend)
            errors = {name: relative_error(actual[name], expected[name]) for name in expected}
            worst = max(errors, key=errors.get)
            rows.append(dict(backend=backend, dtype=dtype_name, layout=layout, worst=worst,
                             max_rel_error=errors[worst], tolerance=tolerance, ok=errors[worst] <= tolerance))
    missing = [] if "triton" in backends else ["triton: " + unusable_reason("triton", device)]
    return dict(ok=all(r["ok"] for r in rows), not_run=missing)


def scan_outputs(inputs: dict, backend: str) -> dict:
    """y, the last state and the gradients of a fixed random linear function of both."""
    inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # detach keeps the strides
    y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(t.shape, generator=g).to(t.device) for t in (y, last)]
    loss = (y.float() * weights[0]).sum() + (last * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return {"y": y.float(), "last_state": last, **{f"grad_{k}": g.float() for k, g in zip(inputs, grads)}}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def usable(backend: str, device: torch.device) -> bool:
    return unusable_reason(backend, device) == ""


def unusable_reason(backend: str, device: torch.device) -> str:
    """Why the selective-scan ``backend`` cannot run on ``device`` ("" when it can)."""
    try:
        check_backend(backend, device)
    except RuntimeError as e:
        return str(e)
    return ""


def scan_speed(device: torch.device, cfg: dict, rows: list) -> dict:
    """Forward and backward of each backend at the mixer layers, bf16 (fp32 in the dry run) in the mixer's
    layout; the torch backend's time over triton's for forward + backward."""
    backends = [b for b in ("triton", "torch", "mamba_ssm") if usable(b, device)]
    not_run = [f"{b}: {unusable_reason(b, device)}" for b in ("triton", "mamba_ssm") if b not in backends]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for label, (channels, length) in cfg["scan_shapes"].items():
        inputs = scan_inputs(cfg["batch"], channels, cfg["scan_state"], length, device, dtype=dtype, layout="mixer")
        times = {}
        for backend in backends:
            times[backend] = time_passes(inputs, backend, device, cfg["scan_warmup"], cfg["scan_repeats"])
            for direction, seconds in times[backend].items():
                rows.append(dict(layer=label, batch=cfg["batch"], E=channels, L=length,
                                 dtype=str(dtype).replace("torch.", ""), backend=backend, direction=direction,
                                 us=seconds * 1e6, **kernel_estimate(backend, label, dtype, direction, cfg["batch"])))
        if "triton" in times:
            both = {b: sum(t.values()) for b, t in times.items()}
            rows.append(dict(layer=label, backend="torch / triton", direction="forward + backward",
                             triton_over_torch=both["torch"] / both["triton"]))
    return dict(backends=backends, not_run=not_run)


def kernel_estimate(backend: str, label: str, dtype: torch.dtype, direction: str, batch: int) -> dict:
    """est_us and roofline_us of the Triton kernel from its compiled sm_90 code (empty for the other
    backends, and under the interpreter of the dry run, which has no compiler)."""
    if backend != "triton" or interpreted():
        return {}
    try:
        from tools.bench.kernels import layer_estimate

        estimate = layer_estimate(label, dtype, direction, batch=batch)
    except Exception as e:  # the estimate compiles for sm_90; a failure there must not cost the timing
        return dict(estimate_error=f"{type(e).__name__}: {e}")
    return {k: estimate[k] for k in ("est_us", "roofline_us")}


def build(name: str, cfg: dict, device: torch.device, tread: bool):
    """(model, AdamW, diffusion, x, y): the backbone, with the paper's TREAD route when ``tread``."""
    overrides = cfg["overrides"].get(name, {})
    with torch.device("meta"):
        depth = models.create_model(name, **overrides).router.depth
    routes = [(2, depth - 4, 0.5)] if tread else None
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place; .to() moves anything built on the CPU explicitly
        model = models.create_model(name, routes=routes, **overrides).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.input_size
    x = torch.randn(cfg["batch"], model.in_channels, size, size, device=device)
    y = torch.randint(0, model.num_classes, (cfg["batch"],), device=device)
    return model, optimizer, ssm_diffusion.create_diffusion("ddpm"), x, y


def time_training(model, optimizer, diffusion, x, y, device, cfg: dict) -> dict:
    """Median step time, images/s and peak memory of ``cfg['steps']`` steps after ``cfg['warmup']``."""
    train_step = TrainStep(model, diffusion, optimizer)  # the trainer's step: loss, backward, AdamW

    def step():
        with autocast(device):
            return train_step([(x, y, None, None)])

    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(cfg["warmup"] - 1):
        step()
    reset_memory(device)
    seconds = median_seconds(step, device, cfg["steps"])
    return dict(first_step_s=first, step_s=seconds, images_per_s=x.shape[0] / seconds,
                peak_memory_gib=peak_memory_gib(device))


def utilisation(macs: int, images_per_s: float, peaks: dict) -> dict:
    """TFLOP/s (forward 1x + backward 2x, 2 FLOP per MAC) and MFU against each known peak."""
    tflops = 6 * macs * images_per_s / 1e12
    return dict(tflops=tflops, **{f"mfu_{name}": tflops / peak for name, peak in peaks.items() if peak})


def training(device: torch.device, cfg: dict, peaks: dict, rows: list) -> dict:
    for name in BACKBONES:
        for tread in (False, True):
            model, optimizer, diffusion, x, y = build(name, cfg, device, tread)
            macs = models.count_macs(model, routed=tread)
            result = time_training(model, optimizer, diffusion, x, y, device, cfg)
            row = dict(backbone=name, tread=tread, macs=macs, **result, **utilisation(macs, result["images_per_s"], peaks))
            base = rows[-1] if tread and rows and rows[-1]["backbone"] == name else None
            if base is not None:
                row["measured_speedup"] = base["step_s"] / row["step_s"]
                row["analytic_speedup"] = base["macs"] / row["macs"]
                row["tread_efficiency"] = row["measured_speedup"] / row["analytic_speedup"]
            rows.append(row)
            del model, optimizer
            reset_memory(device)
    return {}


def sampling(device: torch.device, cfg: dict, rows: list) -> dict:
    for name in BACKBONES:
        rows.append(sampling_pass(name, device, cfg))
        reset_memory(device)
    return {}


def sampling_pass(name: str, device: torch.device, cfg: dict) -> dict:
    """A DDIM pass of ``cfg['sample_steps']`` steps with classifier-free guidance (scale 4) at batch size."""
    model, _, diffusion, x, y = build(name, cfg, device, tread=False)
    model.eval()
    guidance = ssm_diffusion.Guidance(cfg_scale=4.0)

    def sample():
        with autocast(device):
            return diffusion.sample(model, torch.randn_like(x), {"y": y}, sampler="ddim", steps=cfg["sample_steps"],
                                    guidance=guidance)

    sample()
    seconds = median_seconds(sample, device, 2)
    steps = cfg["sample_steps"]
    return dict(backbone=name, tokens=(model.input_size // 2) ** 2, batch=x.shape[0], steps=steps, cfg_scale=4.0,
                pass_s=seconds, ms_per_step=seconds / steps * 1e3, images_per_s=x.shape[0] / seconds)


def compiled_training(device: torch.device, cfg: dict, peaks: dict, eager: dict | None, rows: list) -> dict:
    model, optimizer, diffusion, x, y = build("DiT-XL/2", cfg, device, tread=False)
    macs = models.count_macs(model, routed=False)
    compiled = torch.compile(model, backend=cfg["compile_backend"])
    result = time_training(compiled, optimizer, diffusion, x, y, device, cfg)
    row = dict(backbone="DiT-XL/2", backend=cfg["compile_backend"], **result,
               **utilisation(macs, result["images_per_s"], peaks))
    if eager is not None:
        row["speedup_over_eager"] = result["images_per_s"] / eager["images_per_s"]
    rows.append(row)
    del model, compiled, optimizer
    reset_memory(device)
    return {}


# --------------------------------------------------------------------------------------------------
# running the parts within their budgets


class PartCut(Exception):
    """A part ran out of its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`PartCut` in this (the main) thread after ``seconds``. Python code is interrupted at
    once; a running kernel or a C++ call finishes first. Yields a dict whose "expired" says whether the
    limit struck (a caller may see PartCut wrapped in another exception, e.g. by Triton's interpreter)."""
    state = dict(expired=False)

    def expire(signum, frame):
        state["expired"] = True
        raise PartCut(f"cut at its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def device_problem(device: torch.device) -> str:
    """"" while the device still works; else the error a trivial operation on it raises (a sticky CUDA
    error, after which nothing more can run in this process)."""
    if device.type != "cuda":
        return ""
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def run_part(part, budget: float, device: torch.device) -> dict:
    """{status: ok | cut | failed, rows, seconds, ...}: the part's result within ``budget`` seconds."""
    rows = []
    start = time.perf_counter()
    limit = dict(expired=False)
    try:
        with time_limit(budget) as limit:
            result = dict(status="ok", rows=rows, **part(rows))
    except Exception as e:  # one broken part must not hide the others' results
        if limit["expired"]:
            result = dict(status="cut", rows=rows, reason=f"cut at its {budget:.0f} s budget")
        else:
            result = dict(status="failed", rows=rows, reason=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc())
    with contextlib.suppress(Exception):  # after a CUDA error the clean-up may raise too
        reset_memory(device)
    result["seconds"] = time.perf_counter() - start
    return result


def run(args) -> dict:
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = sizes(args.dry_run)
    os.makedirs(args.out, exist_ok=True)
    report = dict(command="python tools/gpu_check.py " + " ".join(shlex.quote(a) for a in args.argv),
                  dry_run=args.dry_run, budget_s=args.budget_s, sizes=repr(cfg), parts={})

    def first_row(part: str) -> dict:
        rows = report["parts"].get(part, {}).get("rows", [])
        return rows[0] if rows else {}

    def peaks() -> dict:
        return dict(measured=first_row("matmul_peak").get("tflops"),
                    datasheet=first_row("environment").get("datasheet_bf16_tflops"))

    def eager_dit() -> dict | None:
        rows = report["parts"].get("training", {}).get("rows", [])
        return next((r for r in rows if r["backbone"] == "DiT-XL/2" and not r["tread"]), None)

    parts = {
        "environment": lambda rows: environment(device, rows),
        "matmul_peak": lambda rows: matmul_peak(device, cfg, rows),
        "scan_parity": lambda rows: scan_parity(device, cfg, rows),
        "scan_speed": lambda rows: scan_speed(device, cfg, rows),
        "training": lambda rows: training(device, cfg, peaks(), rows),
        "sampling": lambda rows: sampling(device, cfg, rows),
        "torch_compile": lambda rows: compiled_training(device, cfg, peaks(), eager_dit(), rows),
    }
    deadline = time.perf_counter() + args.budget_s
    broken = ""
    for name, part in parts.items():
        if args.only and name not in args.only and name != "environment":
            continue
        left = deadline - time.perf_counter()
        if broken or left <= 0:
            reason = f"skipped: the device is unusable ({broken})" if broken else "skipped: the total budget is spent"
            report["parts"][name] = dict(status="skipped", rows=[], reason=reason, seconds=0.0)
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            report["parts"][name] = result = run_part(part, min(BUDGET_S[name], left), device)
            print(f"[gpu_check] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
            if result["status"] == "failed":
                broken = device_problem(device)
        write(report, args.out)
    return report


# --------------------------------------------------------------------------------------------------
# the report


def verdicts(report: dict) -> list[dict]:
    """Each target with its measured value (None where its part did not run). A dry run's numbers come
    from toy sizes on a CPU: its "met" column stays empty except for parity."""
    parts = report["parts"]
    out = []
    rows = parts.get("training", {}).get("rows", [])
    dit = next((r for r in rows if r["backbone"] == "DiT-XL/2" and not r["tread"]), None)
    mfu = dit and dit.get("mfu_measured")
    out.append(dict(target=f"DiT-XL/2 bf16 MFU >= {TARGETS['dit_mfu']:.0%} of the measured matmul peak",
                    value=mfu, ok=None if mfu is None else mfu >= TARGETS["dit_mfu"]))
    for r in (r for r in rows if "tread_efficiency" in r):
        out.append(dict(target=f"{r['backbone']}: TREAD >= {TARGETS['tread_efficiency']:.0%} of analytic speedup",
                        value=r["tread_efficiency"], ok=r["tread_efficiency"] >= TARGETS["tread_efficiency"]))
    for r in parts.get("scan_speed", {}).get("rows", []):
        if "triton_over_torch" in r:
            out.append(dict(target=f"triton scan >= {TARGETS['triton_over_torch']:.0f}x torch, {r['layer']} layer",
                            value=r["triton_over_torch"], ok=r["triton_over_torch"] >= TARGETS["triton_over_torch"]))
    if report["dry_run"]:
        out = [dict(v, ok=None) for v in out]
    parity = parts.get("scan_parity", {})
    if "ok" in parity:
        out.append(dict(target="scan backends match the reference loop", value=None, ok=parity["ok"]))
    return out


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    env = (report["parts"].get("environment", {}).get("rows") or [{}])[0]
    peak = (report["parts"].get("matmul_peak", {}).get("rows") or [{}])[0]
    lines = [
        f"# GPU check{' (dry run: CPU, toy sizes)' if report['dry_run'] else ''}",
        "",
        f"{env.get('date', '-')}, {env.get('device_name', '-')}; torch {env.get('torch', '-')}, "
        f"triton {env.get('triton', '-')}, Python {env.get('python', '-')}; TF32 {fmt(env.get('tf32'))}; "
        f"matmul peak measured here {fmt(peak.get('tflops'))} TFLOP/s, datasheet "
        f"{fmt(env.get('datasheet_bf16_tflops'))} TFLOP/s",
        "",
        f"Command: `{report['command']}` (budget {report['budget_s']:.0f} s)",
        "",
        "## Targets",
        "",
        table([dict(target=v["target"], value=v["value"], met={True: "met", False: "MISSED", None: "-"}[v["ok"]])
               for v in report["verdicts"]]),
    ]
    for name, part in report["parts"].items():
        lines += ["", f"## {name.replace('_', ' ')} ({part['status']}, {part.get('seconds', 0):.0f} s)", ""]
        if part["status"] != "ok":
            lines += [part["reason"], ""]
        if part["rows"]:
            lines.append(table(part["rows"]))
        lines += [f"- not run: {reason}" for reason in part.get("not_run", [])]
    return "\n".join(lines) + "\n"


def write(report: dict, out: str) -> str:
    report["verdicts"] = verdicts(report)
    text = markdown(report)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="run every part on CPU at toy sizes (no GPU needed)")
    p.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts (and environment)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S,
                   help=f"total time budget in seconds (default {TOTAL_BUDGET_S}); parts also have their own")
    args = p.parse_args(argv)
    args.argv = argv
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.dry_run:
        # Triton kernels run on CPU tensors only when the interpreter is on before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        p.error("no CUDA device visible; run on a GPU machine, or add --dry-run to exercise the check on CPU")
    report = run(args)
    print(write(report, args.out))
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} and {os.path.join(args.out, 'gpu_check.md')}")


if __name__ == "__main__":
    main()
