"""Validation of a whole resolved config before a run creates or computes anything.

:func:`config_problems` lists every problem it finds, one line each, naming the key, its value and the
fix; :func:`validate_config` raises them together as one :class:`ConfigError`. Types are checked against
the defaults of ``configs/base.py``; names (model, sampler, schedule, precision, objective, loss, data
set) against what the library offers; the routes against the model's depth by building the model on
the meta device (no memory, no time); files that must exist against the disk.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ssm_tread.train.config import GROUPS, ConfigError, defaults, model_spec

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("bf16", "fp32")
DATASETS = ("digits", "mnist", "latents")
DIGITS_GEOMETRY = {"channels": 1, "num_classes": 10}
LATENT_VERIFY = ("sample", "full", "none")


def _type_problem(key: str, value, default) -> str | None:
    """A line if ``value`` does not have the type of the base default (ints pass for floats, lists for tuples)."""
    if default is None:
        return None
    expected = type(default)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok, expected = isinstance(value, (list, tuple)), list
    else:
        ok = isinstance(value, expected)
    if ok:
        return None
    return f"{key}={value!r}: expected {expected.__name__} like {default!r}; set {key}=<{expected.__name__}>"


class _Problems(list):
    def add(self, key: str, value, problem: str, fix: str) -> None:
        self.append(f"{key}={value!r}: {problem}; {fix}")

    def at_least(self, cfg: dict, key: str, low, fix_value) -> bool:
        group, name = key.split(".")
        value = cfg[group][name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            self.add(key, value, f"must be >= {low}", f"e.g. {key}={fix_value}")
            return False
        return True

    def choice(self, key: str, value, valid) -> bool:
        if value not in valid:
            self.add(key, value, "unknown name", f"choose one of {', '.join(map(repr, valid))}")
            return False
        return True


def dataset_geometry(cfg: dict) -> dict | None:
    """image_size, channels, num_classes of the run's data, read without loading it (None if unknown)."""
    data = cfg["data"]
    if data["name"] == "digits":
        return {"image_size": data["kwargs"].get("image_size", 16), **DIGITS_GEOMETRY}
    if data["name"] == "mnist":
        return {"image_size": 32, **DIGITS_GEOMETRY}
    from ssm_tread.data.latents import read_index
    try:
        index = read_index(data["root"])
    except (OSError, ValueError):
        return None
    return {"image_size": index["latent_shape"][1], "channels": index["latent_shape"][0],
            "num_classes": index["num_classes"]}


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _check_model(cfg: dict, geometry: dict | None, problems: _Problems) -> None:
    """Build the model on the meta device, first without routes (checks its name and keyword arguments), then
    with them: an error is the routes' only when the model without them builds (parse_routes, or the model)."""
    from ssm_tread.models import FAMILIES, MODEL_NAMES, create_model
    from ssm_tread.routing import parse_routes

    m, r = cfg["model"], cfg["routing"]
    data = SimpleNamespace(**(geometry or {"image_size": 32, "channels": 4, "num_classes": 1000}))
    try:  # a keyword given twice (model.kwargs.num_classes) is a TypeError
        name, kwargs = model_spec({**cfg, "routing": {**r, "routes": []}}, data)
        with torch.device("meta"):
            depth = len(create_model(name, **kwargs).blocks)
    except (ValueError, TypeError, AssertionError) as e:
        message = _first_line(e)
        if "unknown model" in message:
            problems.add("model.name", m["name"], message.split(" Valid names")[0],
                         f"choose one of {', '.join(MODEL_NAMES)}, or {', '.join(FAMILIES)} with model.kwargs")
        else:
            problems.add("model.kwargs", m["kwargs"], message, "fix the model's keyword arguments")
        return
    try:
        parse_routes(r["routes"], depth)
        name, kwargs = model_spec(cfg, data)
        with torch.device("meta"):
            create_model(name, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        problems.add("routing.routes", r["routes"], _first_line(e), f"give a list of (start, end, ratio) with "
                     f"0 <= start <= end < {depth} (the model's depth), e.g. routing.routes=[(1, 1, 0.5)]")


def _check_sampling(cfg: dict, problems: _Problems) -> None:
    from ssm_tread.diffusion import OBJECTIVES, create_diffusion
    from ssm_tread.sampling import make_guidance

    d, sc = cfg["diffusion"], cfg["sample"]
    if not problems.choice("diffusion.objective", d["objective"], OBJECTIVES):
        return
    try:
        diffusion = create_diffusion(d["objective"], **d["kwargs"])
    except (ValueError, TypeError) as e:
        problems.add("diffusion.kwargs", d["kwargs"], str(e), "see ssm_tread.diffusion.create_diffusion")
        return
    if sc["sampler"] is not None:
        problems.choice("sample.sampler", sc["sampler"], diffusion.samplers)
    steps, respace = sc["steps"], getattr(diffusion, "respace", None)  # ddpm also takes a spacing like "ddim50"
    if steps is None:
        pass
    elif not (isinstance(steps, int) and steps >= 1 or respace and isinstance(steps, str)):
        problems.add("sample.steps", steps, "must be a positive integer", "e.g. sample.steps=50, or None")
    elif sc["sampler"] == "dpm_solver":  # counts model evaluations: no respacing
        if isinstance(steps, str):
            problems.add("sample.steps", steps, "dpm_solver takes a number of model evaluations",
                         "e.g. sample.steps=50")
    elif respace:
        try:
            respace(steps)
        except ValueError as e:
            problems.add("sample.steps", steps, str(e), "choose a number of steps that divides the timesteps evenly")
    try:
        make_guidance(sc)
    except (ValueError, TypeError) as e:
        problems.add("sample.interval/routing_guidance", (sc["interval"], sc["routing_guidance"]), str(e),
                     "see ssm_tread.diffusion.guidance.Guidance")
    if sc["cfg_scale"] != 1.0 and cfg["model"]["class_dropout_prob"] == 0:
        problems.add("sample.cfg_scale", sc["cfg_scale"], "guidance needs the null class that label dropout trains",
                     "set model.class_dropout_prob > 0 or sample.cfg_scale=1.0")


def _check_data(cfg: dict, problems: _Problems) -> None:
    data = cfg["data"]
    if not problems.choice("data.name", data["name"], DATASETS):
        return
    if data["num_workers"] is not None and not isinstance(data["num_workers"], int):
        problems.add("data.num_workers", data["num_workers"], "must be an integer or None",
                     "e.g. data.num_workers=2, or None to size it to the machine")
    problems.at_least(cfg, "data.num_workers", 0, 2)
    problems.choice("data.verify", data["verify"], LATENT_VERIFY)
    if data["name"] != "latents":
        return
    if not data["root"]:
        problems.add("data.root", data["root"], "is empty", "point data.root=/path/to/latents at the extracted latents")
    elif not Path(data["root"]).is_dir():
        problems.add("data.root", data["root"], "does not exist",
                     "extract the ImageNet latents there (tools/extract_latents.py) or point data.root at them")
    elif not Path(data["root"], "index.json").is_file():
        problems.add("data.root", data["root"], "holds no index.json (not a latent directory)",
                     "point data.root at the --out folder of tools/extract_latents.py")


def _check_optim(cfg: dict, problems: _Problems) -> None:
    oc = cfg["optim"]
    if oc["lr"] <= 0:
        problems.add("optim.lr", oc["lr"], "must be > 0", "e.g. optim.lr=1e-4")
    problems.at_least(cfg, "optim.weight_decay", 0, 0.0)
    if len(oc["betas"]) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in oc["betas"]):
        problems.add("optim.betas", oc["betas"], "must be two numbers in [0, 1)", "e.g. optim.betas=(0.9,0.999)")
    if oc["eps"] <= 0:
        problems.add("optim.eps", oc["eps"], "must be > 0", "e.g. optim.eps=1e-8")
    problems.at_least(cfg, "optim.warmup_steps", 0, 0)
    problems.choice("optim.schedule", oc["schedule"], LR_SCHEDULES)
    if problems.at_least(cfg, "optim.min_lr", 0, 0.0) and oc["schedule"] == "cosine" and oc["min_lr"] > oc["lr"] > 0:
        problems.add("optim.min_lr", oc["min_lr"], f"exceeds optim.lr={oc['lr']}", "set optim.min_lr <= optim.lr")
    problems.at_least(cfg, "optim.grad_clip", 0, 1.0)


def _check_train(cfg: dict, world: int, problems: _Problems) -> None:
    tc = cfg["train"]
    for key, low, example in (("steps", 1, 1000), ("batch_size", 1, 256), ("grad_accum", 1, 1), ("seed", 0, 0),
                              ("cpu_threads", 0, 0), ("ckpt_every", 0, 10000), ("keep_every", 0, 0)):
        problems.at_least(cfg, f"train.{key}", low, example)
    if not problems.at_least(cfg, "train.keep_last", 1, 2):
        problems[-1] += " (pruning would delete the newest checkpoint)"
    if not 0 <= tc["ema_decay"] <= 1:
        problems.add("train.ema_decay", tc["ema_decay"], "must be in [0, 1]", "e.g. train.ema_decay=0.9999")
    problems.choice("train.precision", tc["precision"], PRECISIONS)
    if tc["batch_size"] >= 1 and tc["grad_accum"] >= 1 and tc["batch_size"] % (world * tc["grad_accum"]):
        problems.add("train.batch_size", tc["batch_size"], f"is not divisible by {world} rank(s) x "
                     f"train.grad_accum={tc['grad_accum']}", "change one of them (a resumed run keeps its "
                     f"global batch: change train.grad_accum or the number of ranks)")
    if tc["fsdp"] and tc["compile"]:
        problems.add("train.compile", True, "does not combine with train.fsdp (FSDP's per-block gathers break the "
                     "compiled graph)", "set train.compile=false or train.fsdp=false")
    if tc["resume"] not in ("none", "auto") and not Path(tc["resume"]).is_file():
        problems.add("train.resume", tc["resume"], "is not a file", "pass a checkpoint path, 'auto' or 'none'")
    if tc["init_from"] and not Path(tc["init_from"]).exists():
        problems.add("train.init_from", tc["init_from"], "does not exist",
                     "pass a checkpoint file or run directory to start from, or '' for a random init")


def _check_log_and_sample(cfg: dict, geometry: dict | None, problems: _Problems) -> None:
    lc, sc = cfg["log"], cfg["sample"]
    problems.at_least(cfg, "log.every", 1, 100)
    problems.at_least(cfg, "log.grid_every", 0, 10000)
    for key, low, example in (("batch_size", 1, 32), ("grid_per_class", 1, 8), ("grid_cols", 0, 0), ("seed", 0, 0)):
        problems.at_least(cfg, f"sample.{key}", low, example)
    latent = cfg["data"]["name"] == "latents"
    sampled = lc["grid_every"] or cfg["eval"]["num_samples"] or not latent  # digits: samples.png at the end
    rows = sc["grid_classes"]  # None: 8 classes of the data set (train.config.grid_classes)
    if sampled and geometry is not None and rows is not None:
        n = geometry["num_classes"]
        if not (isinstance(rows, (list, tuple)) and rows and all(isinstance(c, int) and 0 <= c < n for c in rows)):
            problems.add("sample.grid_classes", rows, f"needs a list of classes in 0..{n - 1}",
                         "e.g. sample.grid_classes=[0,1,2], or None for 8 of the data set's")
    if latent and (lc["grid_every"] or cfg["eval"]["num_samples"]) and not Path(sc["vae"], "config.json").is_file():
        problems.add("sample.vae", sc["vae"], f"no VAE at {sc['vae']!r} (sample grids and evaluation decode latents "
                     f"with it)", f"download stabilityai/sd-vae-ft-ema there (huggingface-cli download "
                     f"stabilityai/sd-vae-ft-ema --local-dir {sc['vae']}) or point sample.vae at a local copy, "
                     f"or set log.grid_every=0 eval.num_samples=0 eval.every=0")


def _check_eval(cfg: dict, geometry: dict | None, problems: _Problems) -> None:
    from ssm_tread.train.evaluation import check_eval_config

    ec, sc = cfg["eval"], cfg["sample"]
    if not (problems.at_least(cfg, "eval.num_samples", 0, 5000) and problems.at_least(cfg, "eval.every", 0, 0)):
        return
    try:
        check_eval_config(cfg)
    except ConfigError as e:
        problems.append(str(e))
        return
    if ec["num_samples"] and cfg["data"]["name"] != "latents" and geometry is not None:
        if ec["num_samples"] // geometry["num_classes"] < sc["grid_per_class"]:
            problems.add("eval.num_samples", ec["num_samples"], f"gives fewer than sample.grid_per_class="
                         f"{sc['grid_per_class']} per class, and the final grid is cut from the eval samples",
                         "raise the one or lower the other")


def config_problems(cfg: dict, world: int = 1) -> list[str]:
    """Every problem of ``cfg``, one line each (empty if it can run on ``world`` ranks)."""
    from ssm_tread.diffusion import LOSS_TYPES
    from ssm_tread.ops import BACKENDS

    base = defaults()
    problems = _Problems()
    for group in GROUPS:
        for key, default in base[group].items():
            if key in cfg[group]:
                problem = _type_problem(f"{group}.{key}", cfg[group][key], default)
                if problem:
                    problems.append(problem)
    if problems:  # the range checks below assume the types
        return problems
    if cfg["model"]["scan_backend"] is not None:
        problems.choice("model.scan_backend", cfg["model"]["scan_backend"], BACKENDS)
    if not 0 <= cfg["model"]["class_dropout_prob"] < 1:
        problems.add("model.class_dropout_prob", cfg["model"]["class_dropout_prob"], "must be in [0, 1)",
                     "e.g. model.class_dropout_prob=0.1")
    problems.choice("routing.loss", cfg["routing"]["loss"], LOSS_TYPES)
    _check_data(cfg, problems)
    geometry = dataset_geometry(cfg) if cfg["data"]["name"] in DATASETS else None
    _check_model(cfg, geometry, problems)
    _check_sampling(cfg, problems)
    _check_optim(cfg, problems)
    _check_train(cfg, world, problems)
    _check_log_and_sample(cfg, geometry, problems)
    _check_eval(cfg, geometry, problems)
    return problems


def validate_config(cfg: dict, world: int | None = None) -> None:
    """Raise a :class:`ConfigError` with one line per problem of ``cfg`` (``world``: ranks, default from
    the WORLD_SIZE that torchrun sets)."""
    world = world or int(os.environ.get("WORLD_SIZE", 1))
    problems = config_problems(cfg, world)
    if problems:
        error = ConfigError("\n".join(problems))
        error.node_local = any(line.startswith("data.root=") for line in problems)  # a copy on the node's disk
        raise error
