"""Benchmark model specs: a compact command-line syntax for a trainer config, parsed here and only here.

A spec is a preset name (:data:`PRESETS`) or ``key=value`` pairs separated by commas:
``model=NAME`` (a create_model name, required), ``label=TEXT``, ``batch=N`` (train.batch_size, default 2),
``route=START:END:RATIO`` (routing.routes, several joined by ``;``; ``route=paper`` or no route: block 2
to depth-4 at 0.5), ``objective=ddpm|flow`` (diffusion.objective), ``precision=fp32|bf16``
(train.precision, default fp32); any other key is a model keyword (model.kwargs), e.g.
``model=DiM,hidden_size=384,depth=25,patch_size=2,batch=2``. ``input_size``, ``in_channels`` and
``num_classes`` set the random batch the step trains on (default: ImageNet-256 latents, 4x32x32, 1000
classes). A preset can be changed the same way: ``dit-b2,batch=4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssm_tread.models import create_model
from ssm_tread.train.config import DEFAULT_BASE, load_config

# The CPU targets: DiT-B/2 is the paper's; the Mamba models are the smallest preset-alikes with a 256-token
# (32x32x4, patch 2) latent and routes of the same shape (2 -> depth-4, ratio 0.5). The tiny ones are for
# tests and smoke runs.
PRESETS = {
    "dit-b2": "model=DiT-B/2,route=2:8:0.5",
    "zigma-s2": "model=ZigMa-S/2,route=2:20:0.5",
    "dim-s2": "model=DiM,label=DiM-S/2 (384 x 25),hidden_size=384,depth=25,patch_size=2,route=2:21:0.5",
    "dit-tiny": "model=DiT,label=DiT-tiny,input_size=8,patch_size=2,hidden_size=32,depth=6,num_heads=2,num_classes=10",
    "zigma-tiny": "model=ZigMa,label=ZigMa-tiny,input_size=8,patch_size=2,hidden_size=32,depth=6,num_classes=10",
    "dim-tiny": "model=DiM,label=DiM-tiny,input_size=8,patch_size=2,hidden_size=32,depth=7,num_classes=10",
}
_GROUP_KEYS = {"batch": "train.batch_size", "objective": "diffusion.objective", "precision": "train.precision"}
DEFAULTS = {"batch": "2", "precision": "fp32"}  # a benchmark's own defaults; the rest is configs/base.py's
_DATA_KEYS = {"input_size": "image_size", "in_channels": "channels", "num_classes": "num_classes"}


@dataclass
class RandomLatents:
    """What a benchmark step trains on instead of a dataset: a random batch of this shape."""

    image_size: int = 32
    channels: int = 4
    num_classes: int = 1000


def paper_routes(depth: int, ratio: float = 0.5) -> list[tuple[int, int, float]]:
    """The paper's placement: one route from block 2 to block depth-4."""
    return [(2, depth - 4, ratio)]


def _pairs(spec: str) -> dict:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty benchmark spec; give a preset or model=NAME,...")
    values = {}
    if "=" not in parts[0]:
        if parts[0] not in PRESETS:
            raise ValueError(f"unknown preset {parts[0]!r}; presets: {', '.join(PRESETS)}; or give model=NAME,...")
        values = _pairs(PRESETS[parts[0]])
        values.setdefault("label", values.get("model"))
        parts = parts[1:]
    for part in parts:
        if "=" not in part:
            raise ValueError(f"benchmark spec {spec!r}: {part!r} is not key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        values[key] = value
    if "model" not in values:
        raise ValueError(f"benchmark spec {spec!r}: give model=NAME or a preset ({', '.join(PRESETS)})")
    return values


def parse_spec(spec: str) -> dict:
    """The trainer config (configs/base.py plus the spec) of one benchmarked model, with ``_label`` and
    ``_data`` (its :class:`RandomLatents`); routes resolved."""
    values = {**DEFAULTS, **_pairs(spec)}
    label, route = values.pop("label", values["model"]), values.pop("route", "paper")
    overrides = [f"model.name={values.pop('model')}"]
    overrides += [f"{_GROUP_KEYS[k]}={values.pop(k)}" for k in list(values) if k in _GROUP_KEYS]
    data = RandomLatents(**{_DATA_KEYS[k]: int(values.pop(k)) for k in list(values) if k in _DATA_KEYS})
    overrides += [f"model.kwargs.{k}={v}" for k, v in values.items()]
    cfg = load_config(DEFAULT_BASE, overrides)
    if route == "paper":
        with torch.device("meta"):
            depth = create_model(cfg["model"]["name"], **cfg["model"]["kwargs"]).router.depth
        routes = paper_routes(depth)
    else:
        routes = [(int(a), int(b), float(c)) for a, b, c in (r.split(":") for r in route.split(";"))]
    cfg["routing"]["routes"] = routes
    cfg["_label"], cfg["_data"] = label, data
    return cfg
