"""The model registry: ``create_model(name, **overrides)`` builds every backbone by name.

Names: ``DiT-{S,B,L,XL}/{2,4,8}``, ``DiM-{S,B,L,H}/2``, ``ZigMa-{S,B,M,L,H}/{1,2,4}`` (size presets), and the
bare family names ``DiT``, ``DiM``, ``ZigMa`` (built from keyword arguments alone). The presets are the
official ones except DiM-S/2 and DiM-B/2, which are ours (see DIM_CONFIGS): Mamba models for ablations
at DiT-S/2's and DiT-B/2's sizes (33.0M and 130.5M parameters), beside the official ZigMa-S/2 (31.8M) and
ZigMa-B/2 (134.8M). Overrides are any
constructor arguments of the family, e.g. ``input_size``, ``in_channels``, ``num_classes``,
``class_dropout_prob``, ``learn_sigma``, ``routes``, ``scan_consistent`` and the size keys.

DiM and ZigMa are imported only when one of them is built, so DiT works on its own.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

import torch.nn as nn

from ssm_tread.models.dit import DIT_CONFIGS, DiT
from ssm_tread.models.macs import count_macs
from ssm_tread.models.official import load_official

# family -> (module, class name, name of its presets dict); presets map model names to size kwargs
FAMILIES: dict[str, tuple[str, str, str]] = {
    "DiT": ("ssm_tread.models.dit", "DiT", "DIT_CONFIGS"),
    "DiM": ("ssm_tread.models.dim", "DiM", "DIM_CONFIGS"),
    "ZigMa": ("ssm_tread.models.zigma", "ZigMa", "ZIGMA_CONFIGS"),
}

MODEL_NAMES: tuple[str, ...] = (
    *DIT_CONFIGS,
    *(f"DiM-{size}/2" for size in ("S", "B", "L", "H")),
    *(f"ZigMa-{size}/{patch}" for size in ("S", "B", "M", "L", "H") for patch in (1, 2, 4)),
)

__all__ = ["DiT", "FAMILIES", "MODEL_NAMES", "count_macs", "create_model", "load_official"]


def _unknown_name_error(name: str) -> ValueError:
    valid = [*MODEL_NAMES, *FAMILIES]
    by_lower = {n.lower(): n for n in valid}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
    hint = f" Did you mean {by_lower[close[0]]!r}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(valid)}")


def _family_of(name: str) -> str:
    if name in FAMILIES:
        return name
    if name in MODEL_NAMES:
        return name.split("-", 1)[0]
    raise _unknown_name_error(name)


def create_model(name: str, **overrides) -> nn.Module:
    """Build model ``name`` with its size preset, then ``overrides`` (constructor keyword arguments).

    Raises ValueError for an unknown name (listing the valid names and the closest one) and for an
    override the family's constructor does not take (listing the ones it does).
    """
    family = _family_of(name)
    module_name, class_name, presets_name = FAMILIES[family]
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    kwargs = {}
    if name != family:
        presets = getattr(module, presets_name)
        if name not in presets:
            raise ValueError(f"{module_name}.{presets_name} has no preset {name!r}; it has {', '.join(presets)}")
        kwargs.update(presets[name])

    valid_keys = [
        parameter.name
        for parameter in inspect.signature(cls).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(overrides) - set(valid_keys))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {', '.join(unknown)}; valid: {', '.join(valid_keys)}")
    kwargs.update(overrides)
    return cls(**kwargs)
