"""The convergence study as ordinary training runs: does TREAD help every backbone, and does keeping the
scan order matter for the state-space ones?

A study file (``configs/study_digits.py``) is a trainer config plus a grid, ``study = dict(backbones,
routes, modes, seeds)``. Each backbone x mode x seed is one ``tools/train.py`` run of that config with
model.name/model.kwargs, routing.routes/routing.scan_consistent and train.seed set: ``none`` (no
routing), ``scan`` (TREAD, survivors read in each layer's own scan order restricted to them) and
``naive`` (TREAD, survivors read in their random selection order). For one seed every mode starts from
the same weights and sees the same batches, noise and diffusion times; the two TREAD modes also draw the
same routed subsets. (DiT never asks for a scan order, so its ``scan`` and ``naive`` runs are the same
computation; the digits study keeps them as a check, a study may leave such runs out with
``skip=[(backbone, mode), ...]``.)

A dry run (``dry_run=True``) trains the same grid through the same code at toy size, the first seed only:
each model at width 16 (2 heads, d_state 4; its depth and routes as they are), 2 steps of batch 4 and
evaluations of 20 samples after each; it checks on a CPU, in seconds a run, that a study will run.

The results come from each run's own files: the evaluations of the EMA model (``eval.every``; digits
FID and class accuracy) and the training time up to them (``train_wall_s``, ``train_cpu_s``) from
metrics.jsonl. A run whose eval.json exists and whose config.json is the config it would get now
(wherever the checkout lies) is finished and skipped; an unfinished one with that config and a checkpoint
(``train.ckpt_every``) continues from its newest checkpoint (``tools/train.py --resume``), any other starts
over, and the study names the key that differs. So an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ssm_tread.checkpoint import latest_checkpoint
from ssm_tread.models import count_macs, create_model
from ssm_tread.progress import progress_bar
from ssm_tread.train.config import ConfigError, load_config, model_spec, to_json
from ssm_tread.train.trainer import build_dataset_from
from tools.bench.study_report import MODES, run_key

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
DRY_RUN = ["train.steps=2", "train.batch_size=4", "train.cpu_threads=1", "optim.warmup_steps=1", "log.every=1",
           "eval.every=1", "eval.num_samples=20", "sample.steps=2", "sample.batch_size=20",
           "sample.grid_per_class=2", "sample.grid_cols=0"]
TOY_WIDTH = {"hidden_size": 16, "num_heads": 2, "d_state": 4}  # the keys a backbone's kwargs have


def grid(cfg: dict, backbones=None, modes=None, seeds=None) -> list[tuple[str, str, int]]:
    """The runs of a study config (or the subset named), seed by seed, backbone by backbone, the modes
    next to each other (so machine load drifts hit the modes alike)."""
    study = cfg.get("_study")
    if study is None:
        raise ConfigError(f"{cfg['_path']} defines no study grid (study = dict(backbones=..., routes=..., modes=..., "
                          f"seeds=...)); see configs/study_digits.py")
    chosen = {"backbones": backbones or list(study["backbones"]), "modes": modes or list(study["modes"]),
              "seeds": seeds if seeds is not None else list(study["seeds"])}
    for key, valid in (("backbones", list(study["backbones"])), ("modes", MODES), ("seeds", list(study["seeds"]))):
        unknown = [v for v in chosen[key] if v not in valid]
        if unknown:
            raise ConfigError(f"--{key} {unknown}: not in the study; choose from {valid}")
    skip = {tuple(run) for run in study.get("skip", ())}
    return [(b, m, s) for s in chosen["seeds"] for b in chosen["backbones"] for m in chosen["modes"]
            if (b, m) not in skip]


def run_overrides(cfg: dict, backbone: str, mode: str, seed: int, runs_root: str | os.PathLike,
                  dry_run: bool = False) -> list[str]:
    """The ``group.key=value`` overrides that turn the study file's config into one run of its grid (at toy
    size for a dry run)."""
    study = cfg["_study"]
    name, kwargs = study["backbones"][backbone]
    if dry_run:
        kwargs = {**kwargs, **{k: v for k, v in TOY_WIDTH.items() if k in kwargs}}
    routes = [] if mode == "none" else [tuple(r) for r in study["routes"][backbone]]
    return [f"model.name={name}", f"model.kwargs={dict(kwargs)!r}", f"routing.routes={routes!r}",
            f"routing.scan_consistent={mode != 'naive'}", f"train.seed={seed}",
            f"train.run_dir={Path(runs_root) / f'{backbone}-{mode}-seed{seed}'}", "train.resume=none",
            "log.progress=false", *(DRY_RUN if dry_run else [])]


def config_difference(cfg: dict) -> str | None:
    """Why the run dir does not hold a run of the config ``cfg``: "no config.json", "unreadable config.json"
    or the first key whose value differs; None where it does. ``train.resume`` (a resumed run records "auto")
    and ``_path`` (where the checkout lies) are not compared."""
    saved = Path(cfg["train"]["run_dir"]) / "config.json"
    if not saved.is_file():
        return "no config.json"
    try:
        ran = json.loads(saved.read_text())
    except ValueError:
        return "unreadable config.json"
    wanted = json.loads(to_json(cfg))
    for config in (ran, wanted):
        config.get("train", {}).pop("resume", None)
        config.pop("_path", None)
    for group in sorted(set(ran) | set(wanted)):
        old, new = ran.get(group), wanted.get(group)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    return f"{group}.{key} was {old.get(key)!r}, is {new.get(key)!r}"
        elif old != new:
            return f"{group} was {old!r}, is {new!r}"
    return None


def started_here(cfg: dict) -> bool:
    """Whether the run dir holds a run of exactly the config ``cfg`` (see :func:`config_difference`)."""
    return config_difference(cfg) is None


def is_finished(cfg: dict) -> bool:
    return (Path(cfg["train"]["run_dir"]) / "eval.json").is_file() and started_here(cfg)


def train_run(config_path: str, overrides: list[str]) -> tuple[int, Path]:
    """``python tools/train.py CONFIG OVERRIDES --resume`` where the run dir holds a checkpoint of this run,
    else ``--overwrite`` (it starts over), with its output appended to the run's train.log; (exit code, log)."""
    cfg = load_config(config_path, overrides)
    run_dir = Path(cfg["train"]["run_dir"])
    resume = started_here(cfg) and latest_checkpoint(run_dir / "checkpoints") is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    with open(log, "a" if resume else "w") as f:
        done = subprocess.run([sys.executable, str(TRAIN), config_path, *overrides,
                               "--resume" if resume else "--overwrite"], stdout=f, stderr=subprocess.STDOUT,
                              check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.returncode, log


def collect_run(cfg: dict, backbone: str, mode: str, seed: int) -> dict:
    """One run's record for :mod:`tools.bench.study_report`, from its run directory."""
    rows = [json.loads(line) for line in (Path(cfg["train"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    evals = []
    for row in (r for r in rows if "eval/fid" in r):
        clock = [r for r in trained if r["step"] <= row["step"]][-1]  # log.every divides eval.every: the same step
        evals.append({"step": row["step"], "fid": row["eval/fid"], "accuracy": row["eval/accuracy"],
                      "train_wall_s": clock["train_wall_s"], "train_cpu_s": clock["train_cpu_s"]})
    name, kwargs = model_spec(cfg, build_dataset_from(cfg))
    model = create_model(name, **kwargs)
    return {"backbone": backbone, "mode": mode, "seed": seed,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "macs": {"full": count_macs(model, routed=False), "routed": count_macs(model, routed=True)},
            "evals": evals, "losses": [{"step": r["step"], "loss": r["loss"]} for r in trained],
            "train_wall_s": trained[-1]["train_wall_s"], "train_cpu_s": trained[-1]["train_cpu_s"]}


def run_study(config_path: str, runs_root: str | os.PathLike, workers: int = 1, backbones=None, modes=None,
              seeds=None, meta: dict | None = None, dry_run: bool = False) -> dict:
    """Train every run of the grid (or the subset named; a dry run: of the first seed, at toy size) not
    finished yet, ``workers`` at a time, then collect every finished run of the whole grid:
    ``{"config", "meta", "runs": {run_key: run}}``."""
    cfg, runs_root = load_config(config_path), Path(runs_root)
    if dry_run and seeds is None:
        seeds = list(cfg["_study"]["seeds"])[:1]
    todo = []
    for run in grid(cfg, backbones, modes, seeds):
        overrides = run_overrides(cfg, *run, runs_root, dry_run)
        run_cfg = load_config(config_path, overrides)
        if is_finished(run_cfg):
            continue
        why = config_difference(run_cfg)
        if why not in (None, "no config.json"):
            print(f"starting over: {run_key(*run)} ran at another config ({why})")
        todo.append((run, overrides))
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, progress_bar(total=len(todo), desc="study runs") as bar:
        for (run, _), (code, log) in zip(todo, pool.map(lambda item: train_run(config_path, item[1]), todo)):
            bar.update(1)
            if code:
                failed.append(f"{run_key(*run)}: exit code {code}, see {log}")
    for line in failed:
        print(f"failed: {line}")
    runs = {}
    for run in grid(cfg):
        overrides = run_overrides(cfg, *run, runs_root, dry_run)
        run_cfg = load_config(config_path, overrides)
        if is_finished(run_cfg):
            runs[run_key(*run)] = collect_run(run_cfg, *run)
        elif (Path(run_cfg["train"]["run_dir"]) / "eval.json").is_file():
            print(f"not counted: {run_key(*run)} finished at another config ({config_difference(run_cfg)})")
    study = json.loads(json.dumps(cfg["_study"]))
    return {"config": {**study, "file": config_path, "runs_dir": str(runs_root), "dry_run": dry_run},
            "meta": meta or {}, "runs": runs}
