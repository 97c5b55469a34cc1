"""Checkpoints: atomic writes, the newest of a run, pruning, and loading with a shape check."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step-{step:07d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, path)] of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file, fsync, then rename over the target.

    A crash at any point leaves either the complete new file or no file at ``path``; the stray temp
    file never matches the checkpoint name pattern.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def prune_checkpoints(folder: str | os.PathLike, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, sparing steps that are multiples of ``keep_every``."""
    found = list_checkpoints(folder)
    for step, path in found[:max(len(found) - keep_last, 0)]:
        if not (keep_every and step % keep_every == 0):
            path.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise CheckpointError(f"no checkpoint (step-*.pt) in {path}; pass a run directory or a checkpoint file")
        path = newest
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; pass a checkpoint file or a run directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    state["path"] = str(path)
    return state


def load_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    """Load a state dict, failing with the mismatching keys listed when it does not fit ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k}: checkpoint {list(weights[k].shape)} vs model {list(v.shape)}"
             for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model"]
        for label, keys in (("shape mismatches", wrong), ("missing from the checkpoint", missing),
                            ("not in the model", unexpected)):
            if keys:
                more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
                lines.append(f"  {len(keys)} {label}: " + "; ".join(keys[:5]) + more)
        lines.append("  fix: build the model with the config the checkpoint was trained with "
                     "(its resolved config is saved in the checkpoint and in the run's config.json), "
                     "or start a fresh run in another train.run_dir")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(weights)
