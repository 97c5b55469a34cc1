"""The GPU check: one command that tells whether ssm_tread's GPU path works and is fast on this machine.

    python tools/gpu_check.py --out gpu_check          # one H100/H200; needs only torch, triton, einops
    python tools/gpu_check.py --dry-run --out /tmp/gc  # the same code on CPU at toy sizes (CI runs this)

Parts (a backend that cannot run here is listed with the reason, a failing part does not stop the
others, and the report is rewritten after every part):

  a. scan parity: the triton and torch selective-scan backends against the reference loop, fp32 and
     bf16 inputs, output, last state and every gradient;
  b. scan speed: forward + backward at the DiM-L/2 and ZigMa-B/2 layer shapes (batch 32, E = 2D,
     N = 16, L = 366 and 256): triton vs torch (and mamba_ssm when installed);
  c. training steps of DiT-XL/2, DiM-L/2 and ZigMa-B/2 in bf16 at batch 32, without and with TREAD
     (one route from block 2 to depth - 4, ratio 0.5): images/s, peak memory, TFLOP/s from
     ``count_macs``, MFU against a bf16 matmul peak measured here, measured vs analytic TREAD speedup;
  d. a classifier-free-guided DDIM sampling pass at 256 tokens per backbone;
  e. DiT-XL/2 training steps under ``torch.compile``.

No data, VAE, diffusers or download is needed. Writes DIR/gpu_check.json and DIR/gpu_check.md and
prints the Markdown. Targets: DiT-XL/2 bf16 MFU >= 45%; TREAD >= 90% of its analytic speedup on every
backbone; the triton scan >= 5x the torch scan.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def tqdm_stand_in() -> None:
    """ssm_tread.diffusion imports tqdm for its samplers' optional progress bars; on a machine with only
    torch, triton and einops a pass-through stands in for it (this check shows no progress bars)."""
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("tqdm.auto")
        stand_in.tqdm = lambda iterable, **kwargs: iterable
        sys.modules.setdefault("tqdm", types.ModuleType("tqdm"))
        sys.modules["tqdm.auto"] = stand_in


tqdm_stand_in()

from ssm_tread import diffusion as ssm_diffusion  # noqa: E402
from ssm_tread import models  # noqa: E402
from ssm_tread.ops import selective_scan  # noqa: E402
from tools.bench.env import device_name, measure_matmul_tflops, synchronize  # noqa: E402
from tools.bench.scan import benchmark_scan, scan_inputs  # noqa: E402
from ssm_tread.ops.selective_scan import check_backend  # noqa: E402
from ssm_tread.train.step import TrainStep  # noqa: E402

BACKBONES = ("DiT-XL/2", "DiM-L/2", "ZigMa-B/2")
TARGETS = {"dit_mfu": 0.45, "tread_efficiency": 0.90, "triton_over_torch": 5.0}


def sizes(dry_run: bool) -> dict:
    """Every size the check uses: the real ones, or toy ones for a CPU dry run."""
    if not dry_run:
        return dict(
            batch=32, overrides={}, parity=(2, 64, 16, 300), scan_state=16,  # parity: batch, E, N, L
            scan_shapes={"DiM-L/2": (2048, 366), "ZigMa-B/2": (1536, 256)}, scan_warmup=2, scan_repeats=10,
            warmup=3, steps=10, sample_steps=25, matmul=8192, compile_backend="inductor",
        )
    toy = dict(hidden_size=32, depth=9, input_size=8)  # DiM needs an odd depth; the route runs 2 -> 5
    return dict(
        batch=2, overrides={"DiT-XL/2": {**toy, "num_heads": 2}, "DiM-L/2": toy, "ZigMa-B/2": toy},
        parity=(1, 8, 4, 40), scan_state=4, scan_shapes={"DiM-L/2": (8, 23), "ZigMa-B/2": (8, 16)},
        scan_warmup=0, scan_repeats=1, warmup=1, steps=2, sample_steps=2, matmul=256, compile_backend="eager",
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
# the parts


def matmul_peak_tflops(device: torch.device, size: int) -> float:
    """The best dense matmul rate reached here (bf16 on CUDA, fp32 on CPU): the peak that MFU divides by."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return measure_matmul_tflops(device, size, dtype)["wall"]


def scan_parity(device: torch.device, cfg: dict) -> dict:
    backends = ["torch"] + ["triton"] * usable("triton", device)
    batch, channels, state, length = cfg["parity"]
    rows = []
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        inputs = scan_inputs(batch, channels, state, length, device)  # A, D, delta_bias stay float32
        inputs = {k: v.detach().to(dtype if k in ("u", "delta", "B", "C", "z") else v.dtype) for k, v in inputs.items()}
        expected = scan_outputs({k: v.float() for k, v in inputs.items()}, "reference")
        for backend in backends:
            actual = scan_outputs(inputs, backend)
            errors = {name: relative_error(actual[name], expected[name]) for name in expected}
            worst = max(errors, key=errors.get)
            rows.append(dict(backend=backend, dtype=str(dtype).replace("torch.", ""), worst=worst,
                             max_rel_error=errors[worst], tolerance=tolerance, ok=errors[worst] <= tolerance))
    missing = [] if "triton" in backends else ["triton: " + unusable_reason("triton", device)]
    return dict(rows=rows, ok=all(r["ok"] for r in rows), not_run=missing)


def scan_outputs(inputs: dict, backend: str) -> dict:
    """y, the last state and the gradients of a fixed random linear function of both."""
    inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}
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


def scan_speed(device: torch.device, cfg: dict) -> dict:
    backends = [b for b in ("triton", "torch", "mamba_ssm") if usable(b, device)]
    not_run = [f"{b}: {unusable_reason(b, device)}" for b in ("triton", "mamba_ssm") if b not in backends]
    rows = []
    for label, (channels, length) in cfg["scan_shapes"].items():
        times = benchmark_scan(cfg["batch"], channels, cfg["scan_state"], length, backends, str(device),
                               warmup=cfg["scan_warmup"], repeats=cfg["scan_repeats"])
        row = dict(shape=f"{label} layer: batch {cfg['batch']}, E={channels}, L={length}",
                   **{f"{b}_ms": t * 1e3 for b, t in times.items()})
        if "triton" in times:
            row["triton_over_torch"] = times["torch"] / times["triton"]
        rows.append(row)
    return dict(rows=rows, backends=backends, not_run=not_run)


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


def training(device: torch.device, cfg: dict, peak: float) -> dict:
    rows = []
    for name in BACKBONES:
        for tread in (False, True):
            model, optimizer, diffusion, x, y = build(name, cfg, device, tread)
            macs = models.count_macs(model, routed=tread)
            result = time_training(model, optimizer, diffusion, x, y, device, cfg)
            tflops = 6 * macs * result["images_per_s"] / 1e12  # forward 1x + backward 2x, 2 FLOP per MAC
            rows.append(dict(backbone=name, tread=tread, macs=macs, **result, tflops=tflops, mfu=tflops / peak))
            del model, optimizer
            reset_memory(device)
    for base, routed in zip(rows[::2], rows[1::2]):
        routed["measured_speedup"] = base["step_s"] / routed["step_s"]
        routed["analytic_speedup"] = base["macs"] / routed["macs"]
        routed["tread_efficiency"] = routed["measured_speedup"] / routed["analytic_speedup"]
    return dict(rows=rows)


def sampling(device: torch.device, cfg: dict) -> dict:
    rows = []
    for name in BACKBONES:
        rows.append(sampling_pass(name, device, cfg))
        reset_memory(device)
    return dict(rows=rows)


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


def compiled_training(device: torch.device, cfg: dict, peak: float, eager: dict | None) -> dict:
    model, optimizer, diffusion, x, y = build("DiT-XL/2", cfg, device, tread=False)
    macs = models.count_macs(model, routed=False)
    compiled = torch.compile(model, backend=cfg["compile_backend"])
    result = time_training(compiled, optimizer, diffusion, x, y, device, cfg)
    tflops = 6 * macs * result["images_per_s"] / 1e12
    row = dict(backbone="DiT-XL/2", backend=cfg["compile_backend"], **result, tflops=tflops, mfu=tflops / peak)
    if eager is not None:
        row["speedup_over_eager"] = result["images_per_s"] / eager["images_per_s"]
    del model, compiled, optimizer
    reset_memory(device)
    return dict(rows=[row])


# --------------------------------------------------------------------------------------------------
# the report


def verdicts(report: dict) -> list[dict]:
    """Each target with its measured value (None where its part did not run). A dry run's numbers come
    from toy sizes on a CPU: its "met" column stays empty except for parity."""
    parts = report["parts"]
    out = []
    rows = parts.get("training", {}).get("rows", [])
    dit = next((r for r in rows if r["backbone"] == "DiT-XL/2" and not r["tread"]), None)
    out.append(dict(target=f"DiT-XL/2 bf16 MFU >= {TARGETS['dit_mfu']:.0%}", value=dit and dit["mfu"],
                    ok=dit and dit["mfu"] >= TARGETS["dit_mfu"]))
    for r in (r for r in rows if r["tread"]):
        out.append(dict(target=f"{r['backbone']}: TREAD >= {TARGETS['tread_efficiency']:.0%} of analytic speedup",
                        value=r["tread_efficiency"], ok=r["tread_efficiency"] >= TARGETS["tread_efficiency"]))
    for r in parts.get("scan_speed", {}).get("rows", []):
        if "triton_over_torch" in r:
            out.append(dict(target=f"triton scan >= {TARGETS['triton_over_torch']:.0f}x torch, {r['shape']}",
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
    env = report["environment"]
    lines = [
        f"# GPU check{' (dry run: CPU, toy sizes)' if report['dry_run'] else ''}",
        "",
        f"{env['date']}, {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
        f"Python {env['python']}; matmul peak measured here: {fmt(report.get('peak_tflops'))} TFLOP/s",
        "",
        f"Command: `{report['command']}`",
        "",
        "## Targets",
        "",
        table([dict(target=v["target"], value=v["value"], met={True: "met", False: "MISSED", None: "-"}[v["ok"]])
               for v in report["verdicts"]]),
    ]
    for name, part in report["parts"].items():
        lines += ["", f"## {name.replace('_', ' ')} ({part['status']}, {part.get('seconds', 0):.0f} s)", ""]
        if part["status"] != "ok":
            lines.append(part["reason"])
            continue
        lines.append(table(part["rows"]))
        lines += [f"- not run: {reason}" for reason in part.get("not_run", [])]
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device_name=device_name(device),
                torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                cuda=torch.version.cuda)


def write(report: dict, out: str) -> str:
    report["verdicts"] = verdicts(report)
    text = markdown(report)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text)
    return text


def run(args) -> dict:
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = sizes(args.dry_run)
    os.makedirs(args.out, exist_ok=True)
    report = dict(command="python tools/gpu_check.py " + " ".join(shlex.quote(a) for a in args.argv),
                  dry_run=args.dry_run, environment=environment(device), sizes=repr(cfg), parts={})
    report["peak_tflops"] = peak = matmul_peak_tflops(device, cfg["matmul"])
    parts = {
        "scan_parity": lambda: scan_parity(device, cfg),
        "scan_speed": lambda: scan_speed(device, cfg),
        "training": lambda: training(device, cfg, peak),
        "sampling": lambda: sampling(device, cfg),
        "torch_compile": lambda: compiled_training(device, cfg, peak, next(
            (r for r in report["parts"].get("training", {}).get("rows", [])
             if r["backbone"] == "DiT-XL/2" and not r["tread"]), None)),
    }
    for name, part in parts.items():
        if args.only and name not in args.only:
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = dict(status="ok", **part())
        except Exception as e:  # one broken part must not hide the others' results
            result = dict(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            reset_memory(device)
        result["seconds"] = time.perf_counter() - start
        report["parts"][name] = result
        print(f"[gpu_check] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
        write(report, args.out)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="run every part on CPU at toy sizes (no GPU needed)")
    p.add_argument("--only", nargs="+", choices=["scan_parity", "scan_speed", "training", "sampling", "torch_compile"],
                   help="run only these parts")
    args = p.parse_args(argv)
    args.argv = argv
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
