"""Plain Python config files, dotted command-line overrides, and the resolved config of a run.

A config file defines one dict per group (``model``, ``routing``, ``diffusion``, ``data``, ``optim``,
``train``, ``log``, ``sample``, ``eval``). ``configs/base.py`` holds every key with its default; an
experiment file starts with ``from base import *`` (or imports another experiment) and changes a few
keys. Imports in a config file resolve against the file's own directory, then the project's configs/,
and are re-executed on every load, so one load never sees another's edits.

A study file (``configs/study_digits.py``) also defines ``study = dict(...)``: the grid of runs that
``tools/benchmark.py study`` trains from it, each this config with a few keys changed. It reaches the
loaded config as ``_study``; ``tools/train.py`` trains the file's own config, one run of the grid.

Overrides are ``group.key=value`` strings, typed by the value they replace (``optim.lr=2e-4``,
``train.steps=20``, ``routing.routes=[(2,8,0.5)]``). Keys inside a dict-valued key may be set or added
(``model.kwargs.depth=9``) and take a Python literal.
"""
from __future__ import annotations

import ast
import copy
import difflib
import json
import os
import runpy
import sys
import threading
import traceback
from pathlib import Path

from ssm_tread.errors import UserError

GROUPS = ("model", "routing", "diffusion", "data", "optim", "train", "log", "sample", "eval")
STUDY = "study"  # the optional grid of a study file
DEFAULT_BASE = Path(__file__).resolve().parents[2] / "configs" / "base.py"
_IMPORTING = threading.Lock()  # held while a config file runs (see _exec_config)
# keys that are gone, with what replaces them; a run's own config.json may still hold them
RETIRED = {"train.overwrite": "overwriting a run is asked for on the command line only: tools/train.py --overwrite"}


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the key and the fix."""

    exit_code = 2


def _exec_config(path: Path) -> dict:
    """Run a config file with its own directory, then the project's configs/, importable.

    The modules it imports from there are loaded fresh and forgotten afterwards. This edits sys.path and
    sys.modules, so one thread at a time runs a config.
    """
    folders = list(dict.fromkeys([str(path.parent), str(DEFAULT_BASE.parent)]))
    siblings = {p.stem for folder in folders for p in Path(folder).glob("*.py")}
    with _IMPORTING:
        stashed = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
        sys.path[:0] = folders
        try:
            return runpy.run_path(str(path))
        except SyntaxError as e:
            raise ConfigError(f"{e.filename}:{e.lineno}: syntax error ({e.msg}) in a config file; "
                              f"fix that line") from None
        except Exception as e:
            frames = [f for f in traceback.extract_tb(e.__traceback__)
                      if Path(f.filename).parent in map(Path, folders)]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(path)
            raise ConfigError(f"{where}: {type(e).__name__}: {e} while running a config file; fix that line") from None
        finally:
            for folder in folders:
                sys.path.remove(folder)
            for name in siblings:
                sys.modules.pop(name, None)
            sys.modules.update(stashed)


def _groups(namespace: dict, path: Path) -> dict:
    public = {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v)
              and type(v).__name__ != "module"}
    for name in public:
        if name not in GROUPS and name != STUDY:
            hint = difflib.get_close_matches(name, GROUPS, n=1)
            raise ConfigError(f"{path}: unknown config group {name!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else f"; groups are {', '.join(GROUPS)}"))
    missing = [g for g in GROUPS if g not in public]
    if missing:
        raise ConfigError(f"{path}: missing config groups {missing}; start the file with `from base import *`")
    return {g: copy.deepcopy(public[g]) for g in GROUPS}


def dotted_keys(cfg: dict) -> list[str]:
    return [f"{g}.{k}" for g in cfg for k in cfg[g]]


def _unknown_key(key: str, schema: dict) -> ConfigError:
    if key in RETIRED:
        return ConfigError(f"{key} is no longer a config key: {RETIRED[key]}")
    hint = difflib.get_close_matches(key, dotted_keys(schema), n=1, cutoff=0.5)
    fix = f"did you mean {hint[0]!r}?" if hint else "see configs/base.py for every key"
    return ConfigError(f"unknown config key {key!r}; {fix}")


def check_keys(cfg: dict, schema: dict) -> None:
    """Every ``group.key`` of ``cfg`` must exist in ``schema`` (the base config)."""
    for group, values in cfg.items():
        for key in values:
            if key not in schema[group]:
                raise _unknown_key(f"{group}.{key}", schema)


def parse_value(text: str, current, key: str = "value"):
    """``text`` as the type of ``current``: bool, int, float, str, or a Python literal for the rest."""
    try:
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if current is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{key}={text!r}: expected {type(current).__name__} like {current!r}") from None
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if type(value) is not type(current):
        raise ConfigError(f"{key}={text!r}: expected {type(current).__name__} like {current!r}")
    return value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``group.key=value`` strings in place; returns ``cfg``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form group.key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in cfg or parts[1] not in cfg[parts[0]]:
            raise _unknown_key(key, cfg)
        node = cfg[parts[0]]
        for depth, part in enumerate(parts[1:-1], start=1):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])} is not a dict")
            node = node[part]
        last = parts[-1]
        node[last] = parse_value(text, node[last], key) if last in node else parse_value(text, None, key)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Load a config file, check its keys against the base config next to it, apply overrides.

    The result is a plain dict of group dicts, with ``_name`` (the file's stem) and ``_path``.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass a file such as configs/quickstart.py")
    base_path = path.parent / "base.py" if (path.parent / "base.py").is_file() else DEFAULT_BASE
    schema = _groups(_exec_config(base_path), base_path)
    namespace = _exec_config(path)
    cfg = _groups(namespace, path)
    check_keys(cfg, schema)
    apply_overrides(cfg, list(overrides))
    cfg["_name"] = path.stem
    cfg["_path"] = str(path)
    if STUDY in namespace:
        cfg["_study"] = copy.deepcopy(namespace[STUDY])
    return cfg


def defaults() -> dict:
    """Every config group with its default values: the groups of configs/base.py."""
    return _groups(_exec_config(DEFAULT_BASE), DEFAULT_BASE)


def model_spec(cfg: dict, data) -> tuple[str, dict]:
    """(create_model name, keyword arguments) of the run's model on ``data``: anything with the data set's
    ``image_size``, ``channels`` and ``num_classes``."""
    m, r = cfg["model"], cfg["routing"]
    kwargs = dict(input_size=data.image_size, in_channels=data.channels, num_classes=data.num_classes,
                  learn_sigma=m["learn_sigma"], class_dropout_prob=m["class_dropout_prob"],
                  routes=[list(route) for route in r["routes"]], scan_consistent=r["scan_consistent"], **m["kwargs"])
    return m["name"], kwargs


DIT_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the ImageNet classes of the DiT README's samples


def grid_classes(sample: dict, num_classes: int) -> list:
    """The rows of a run's sample grids: ``sample.grid_classes``, or by default 8 classes of the data set (the
    DiT README's on ImageNet's 1000, else up to 8 spread evenly over 0..num_classes-1)."""
    if sample["grid_classes"] is not None:
        return list(sample["grid_classes"])
    if num_classes == 1000:
        return DIT_GRID_CLASSES
    rows = min(8, num_classes)
    return [i * num_classes // rows for i in range(rows)]


def run_dir_of(cfg: dict) -> Path:
    return Path(cfg["train"]["run_dir"] or f"runs/{cfg['_name']}")


def flat_config(cfg: dict) -> dict:
    """{"group.key": value} of a config's groups, as its JSON holds them."""
    return {f"{g}.{k}": v for g, values in json.loads(to_json(cfg)).items() if g in GROUPS for k, v in values.items()}


def resume_config(path: str | os.PathLike, overrides: list[str] = (), say=print) -> dict:
    """The config of a resumed run: the run's own (its config.json) plus ``overrides`` given now, with
    ``train.resume=auto``. The config file only locates the run dir (with the overrides); where it now
    differs from the run's config, the run's wins and ``say`` names the keys. Without a config.json in the
    run dir: the config file plus ``overrides``."""
    overrides = [*overrides, "train.resume=auto"]
    cfg = load_config(path, overrides)
    saved = run_dir_of(cfg) / "config.json"
    if not saved.is_file():
        return cfg
    try:
        run_cfg = json.loads(saved.read_text())
    except ValueError as e:
        raise ConfigError(f"{saved} is not valid JSON ({e}); restore it, or resume without it by deleting it "
                          f"(the config file and the overrides given now then make the config)") from None
    schema = defaults()
    for key in RETIRED:
        group, name = key.split(".")
        run_cfg.get(group, {}).pop(name, None)
    for group in GROUPS:  # keys added to the code since the run started take their defaults
        run_cfg[group] = {**schema[group], **run_cfg.get(group, {})}
    check_keys({g: run_cfg[g] for g in GROUPS}, schema)
    apply_overrides(run_cfg, overrides)
    resumed = flat_config(run_cfg)
    differ = sorted(k for k, v in flat_config(cfg).items() if resumed.get(k, v) != v)
    if differ:
        say(f"resuming with the run's config {saved} plus the overrides given now; {Path(path).name} differs in "
            f"{', '.join(differ)} (ignored: give them as overrides to change them)")
    return run_cfg


def to_json(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=False, default=repr)


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(cfg) + "\n")
    os.replace(tmp, path)
