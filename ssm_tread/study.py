"""The convergence study on the bundled digits: does TREAD help every backbone, and does keeping the scan
order matter for the state-space ones?

Small DiT, DiM and ZigMa models of about the same parameter count are each trained three ways with the
same steps and seeds: ``none`` (no routing), ``scan`` (TREAD, survivors read in each layer's own scan
order restricted to them) and ``naive`` (TREAD, survivors read in their random selection order). For one
seed every mode starts from the same weights and sees the same batches, noise and diffusion times; the
two TREAD modes also draw the same routed subsets. (DiT never asks for a scan order, so its ``scan`` and
``naive`` runs are the same computation; they are kept as a check.)

At a few steps the EMA model is sampled (fixed noise and class-balanced labels, the same for every run)
and scored with :class:`ssm_tread.eval.DigitsEvaluator` (digits FID and class accuracy); the training
time up to that step (wall clock and CPU time, evaluations excluded) is recorded with it.

The loop is plain on purpose (``create_model``, ``create_diffusion``, ``build_dataset("digits")``,
``DigitsEvaluator``): the trainer carries checkpointing and distributed machinery that a few hundred
CPU steps do not need. :func:`run_study` writes each finished run to its own JSON file and skips the
runs already there, so an interrupted study resumes where it stopped; several processes can share one
study.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

MODES = ("none", "scan", "naive")
MODE_LABELS = {"none": "no routing", "scan": "TREAD, scan-consistent", "naive": "TREAD, naive random order"}
MODE_STYLE = {"none": ("tab:gray", "-"), "scan": ("tab:blue", "-"), "naive": ("tab:orange", "--")}
METRICS = ("fid", "accuracy")


@dataclass
class StudyConfig:
    """Everything a study run depends on. ``backbones``: label -> (create_model name, keyword arguments);
    ``routes``: label -> TREAD routes of that backbone (used by the ``scan`` and ``naive`` modes)."""

    backbones: dict = field(default_factory=dict)
    routes: dict = field(default_factory=dict)
    modes: tuple = MODES
    seeds: tuple = (0, 1, 2)
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    objective: str = "flow"
    eval_at: tuple = (150, 300, 450, 600)
    eval_samples: int = 256
    sampler: str = "euler"
    sample_steps: int = 20
    eval_seed: int = 1234
    loss_every: int = 25
    threads: int = 1

    def to_json(self) -> dict:
        data = asdict(self)
        data["backbones"] = {k: [v[0], dict(v[1])] for k, v in self.backbones.items()}
        data["routes"] = {k: [list(r) for r in v] for k, v in self.routes.items()}
        return json.loads(json.dumps(data))  # tuples become lists: compares equal to the JSON read back

    @classmethod
    def from_json(cls, data: dict) -> "StudyConfig":
        data = dict(data)
        data["backbones"] = {k: (v[0], dict(v[1])) for k, v in data["backbones"].items()}
        data["routes"] = {k: [tuple(r) for r in v] for k, v in data["routes"].items()}
        for key in ("modes", "seeds", "eval_at"):
            data[key] = tuple(data[key])
        return cls(**data)


def run_key(backbone: str, mode: str, seed: int) -> str:
    return f"{backbone}|{mode}|{seed}"


def build_model(config: StudyConfig, backbone: str, mode: str, image_size: int = 16, channels: int = 1,
                num_classes: int = 10):
    """The backbone for ``mode`` (no routes for "none"; ``scan_consistent`` off for "naive")."""
    from ssm_tread.models import create_model

    if mode not in MODES:
        raise ValueError(f"unknown study mode {mode!r}; choose from {MODES}")
    name, kwargs = config.backbones[backbone]
    routes = [] if mode == "none" else [list(r) for r in config.routes[backbone]]
    return create_model(name, input_size=image_size, in_channels=channels, num_classes=num_classes,
                        learn_sigma=False, routes=routes, scan_consistent=mode != "naive", **kwargs)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lr_factor(step: int, config: StudyConfig) -> float:
    """Linear warm-up, then cosine to 10% of the peak rate at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def eval_inputs(config: StudyConfig, channels: int = 1, image_size: int = 16, num_classes: int = 10):
    """The fixed evaluation noise [N, C, H, W] and class-balanced labels [N] shared by every run."""
    generator = torch.Generator().manual_seed(config.eval_seed)
    labels = torch.arange(config.eval_samples) % num_classes
    labels = labels[torch.randperm(config.eval_samples, generator=generator)]
    noise = torch.randn(config.eval_samples, channels, image_size, image_size, generator=generator)
    return noise, labels


@torch.no_grad()
def evaluate(model, diffusion, config: StudyConfig, evaluator, noise, labels, batch: int = 64) -> dict:
    """Sample the eval set with ``model`` (eval mode, no routing) and score it."""
    images = []
    for lo in range(0, len(labels), batch):
        out = diffusion.sample(model, noise[lo:lo + batch], {"y": labels[lo:lo + batch]}, sampler=config.sampler,
                               steps=config.sample_steps)
        images.append(out.float().clamp(-1, 1))
    result = evaluator.evaluate(torch.cat(images), labels)
    return {"fid": float(result["fid"]), "accuracy": float(result["accuracy"])}


def train_run(config: StudyConfig, backbone: str, mode: str, seed: int, evaluator=None, dataset=None,
              log: Callable[[str], None] | None = None) -> dict:
    """Train one (backbone, mode, seed) and evaluate at ``config.eval_at``. Returns a JSON-ready dict."""
    from ssm_tread.data import build_dataset
    from ssm_tread.diffusion import create_diffusion
    from ssm_tread.models import count_macs

    if evaluator is None:
        from ssm_tread.eval import DigitsEvaluator

        evaluator = DigitsEvaluator()
    dataset = dataset or build_dataset("digits")
    images, targets = dataset.images, dataset.labels  # the whole set lives in memory: [N, 1, 16, 16], [N]
    torch.manual_seed(seed)  # the same initial weights for every mode of this seed
    model = build_model(config, backbone, mode, dataset.image_size, dataset.channels, dataset.num_classes)
    macs = {"full": count_macs(model, routed=False), "routed": count_macs(model, routed=True)}
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = create_diffusion(config.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 10_000)
    model.router.generator = torch.Generator().manual_seed(seed + 20_000)
    label_state = torch.Generator().manual_seed(seed + 30_000).get_state()  # label dropout draws from the
    torch.set_rng_state(label_state)  # global generator: start it alike for every mode of this seed
    eval_noise, eval_labels = eval_inputs(config, dataset.channels, dataset.image_size, dataset.num_classes)

    order, position = torch.randperm(len(targets), generator=data_gen), 0
    evals, losses, window = [], [], []
    train_wall = train_cpu = 0.0
    say = log or (lambda message: None)
    for step in range(1, config.steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        if position + config.batch_size > len(order):
            order, position = torch.randperm(len(targets), generator=data_gen), 0
        index = order[position:position + config.batch_size]
        position += config.batch_size
        x, y = images[index], targets[index]
        noise = torch.randn(x.shape, generator=noise_gen)
        t = torch.rand(x.shape[0], generator=noise_gen)
        loss = diffusion.training_losses(model, x, {"y": y}, noise=noise, t=t)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        # EMA with a warm-up: decay min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
        train_wall += time.perf_counter() - wall
        train_cpu += time.process_time() - cpu
        window.append(float(loss.detach()))
        if step % config.loss_every == 0:
            losses.append({"step": step, "loss": statistics.fmean(window)})
            window = []
        if step in config.eval_at:
            start = time.perf_counter()
            metrics = evaluate(ema, diffusion, config, evaluator, eval_noise, eval_labels)
            evals.append({"step": step, "train_wall_s": train_wall, "train_cpu_s": train_cpu, **metrics,
                          "eval_wall_s": time.perf_counter() - start})
            say(f"  {backbone} {mode} seed {seed} step {step}: fid {metrics['fid']:.3f}, "
                f"accuracy {metrics['accuracy']:.3f} ({train_wall:.1f} s training)")
    return {"backbone": backbone, "mode": mode, "seed": seed, "params": count_params(model), "macs": macs,
            "evals": evals, "losses": losses, "train_wall_s": train_wall, "train_cpu_s": train_cpu}


def load_results(path: str | os.PathLike) -> dict:
    """The merged study JSON (``{"config", "meta", "runs"}``), or {} when there is none."""
    path = Path(path)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_order(config: StudyConfig) -> list[tuple[str, str, int]]:
    """Seed by seed, backbone by backbone, the modes next to each other (so machine load drifts hit the
    modes alike)."""
    return [(b, m, s) for s in config.seeds for b in config.backbones for m in config.modes]


def _slug(key: str) -> str:
    return key.replace("|", "__").replace("/", "-")


def _claim(path: Path) -> bool:
    """Claim a run for this process: create ``path`` exclusively. A claim whose process is gone is stale
    and taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                if pid <= 0:
                    raise ValueError
                os.kill(pid, 0)
                return False  # alive: another process runs it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale claim
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def merge_runs(out_dir: str | os.PathLike, config: StudyConfig, meta: dict | None = None) -> dict:
    """Collect ``out_dir/runs/*.json`` into ``out_dir/study.json`` and return it."""
    out_dir = Path(out_dir)
    runs = {}
    for key in (run_key(*k) for k in run_order(config)):
        path = out_dir / "runs" / f"{_slug(key)}.json"
        if path.exists():
            runs[key] = json.loads(path.read_text())
    data = {"config": config.to_json(), "meta": meta or {}, "runs": runs}
    _write_json(out_dir / "study.json", data)
    return data


def run_study(config: StudyConfig, out_dir: str | os.PathLike, log: Callable[[str], None] | None = print,
              meta: dict | None = None) -> dict:
    """Every run of ``config`` that ``out_dir/runs/`` does not hold yet, then the merged ``study.json``.

    Each finished run is written to its own JSON file at once, so an interrupted study resumes where it
    stopped. Several processes may work on one study at the same time: each claims a run before it starts
    it (``runs/<run>.claim`` holding its pid), so they share the work. ``out_dir/config.json`` pins the
    config: another config is refused.
    """
    from ssm_tread.data import build_dataset
    from ssm_tread.eval import DigitsEvaluator

    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    pinned = out_dir / "config.json"
    if pinned.exists():
        if json.loads(pinned.read_text()) != config.to_json():
            raise ValueError(f"{out_dir} holds a study with another config ({pinned}); remove it or write elsewhere")
    else:
        _write_json(pinned, config.to_json())
    torch.set_num_threads(config.threads)
    dataset = build_dataset("digits")
    evaluator = DigitsEvaluator()
    for backbone, mode, seed in run_order(config):
        key = run_key(backbone, mode, seed)
        path = out_dir / "runs" / f"{_slug(key)}.json"
        claim = path.with_suffix(".claim")
        if path.exists() or not _claim(claim):
            continue
        try:
            if path.exists():  # finished by another process between the two checks
                continue
            if log:
                log(f"run {key} (pid {os.getpid()})")
            start = time.perf_counter()
            result = train_run(config, backbone, mode, seed, evaluator, dataset, log)
            result["total_wall_s"] = time.perf_counter() - start
            _write_json(path, result)
            if log:
                log(f"  {key} done in {result['total_wall_s']:.1f} s")
        finally:
            claim.unlink(missing_ok=True)
        merge_runs(out_dir, config, meta)
    return merge_runs(out_dir, config, meta)


def load_study_config(path: str | os.PathLike) -> StudyConfig:
    """A study config file: Python that defines ``study = dict(...)`` with :class:`StudyConfig` fields."""
    namespace: dict = {}
    exec(compile(Path(path).read_text(), str(path), "exec"), namespace)
    if "study" not in namespace:
        raise ValueError(f"{path} must define study = dict(...) with StudyConfig fields")
    values = dict(namespace["study"])
    for key in ("modes", "seeds", "eval_at"):
        if key in values:
            values[key] = tuple(values[key])
    values["backbones"] = {k: (v[0], dict(v[1])) for k, v in values.get("backbones", {}).items()}
    values["routes"] = {k: [tuple(r) for r in v] for k, v in values.get("routes", {}).items()}
    return StudyConfig(**values)


# --------------------------------------------------------------------------------------------------
# aggregation, tables, plots


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
    """FID (top row) and class accuracy (bottom row) against ``x`` ("step", "train_wall_s" or
    "train_cpu_s"), one column per backbone, mean +- std over seeds (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(data["runs"])
    params = params_of(data["runs"])
    order = list(data.get("config", {}).get("backbones", {}))
    backbones = sorted(agg, key=lambda b: order.index(b) if b in order else len(order))
    fig, axes = plt.subplots(2, len(backbones), figsize=(4.6 * len(backbones), 7.2), squeeze=False)
    xlabel = {"step": "training step", "train_wall_s": "training wall-clock time (s)",
              "train_cpu_s": "training CPU time (s)"}[x]
    for col, backbone in enumerate(backbones):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for mode in MODES:
                rows = agg[backbone].get(mode)
                if not rows:
                    continue
                colour, style = MODE_STYLE[mode]
                xs = [r["step"] if x == "step" else r[f"{x}_mean"] for r in rows]
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
            if col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"Digits convergence: mean \u00b1 std over seeds (shaded), against {xlabel}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
