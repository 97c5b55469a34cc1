"""Checkpoints: atomic, checksummed writes of finite weights; the newest (good) one of a run; pruning that
keeps the newest; loading with a checksum and a shape check.

A checkpoint is one dict, built by :func:`checkpoint_state` for training runs and converted official models
alike (``torch.load(path, weights_only=True)`` reads it):

- ``model``: the weights, a full state dict (gathered under FSDP).
- ``ema``: their exponential moving average: what sampling, evaluation and ``train.init_from`` use.
- ``step``: the optimizer steps taken (0 for a converted model); the data position is the step times the
  global batch, and the learning rate a function of the config and the step.
- ``config``: the run's resolved config (ssm_tread.train.config), whose ``sample`` and ``diffusion`` settings
  sampling takes.
- ``model_name``, ``model_kwargs``: the call ``create_model(model_name, **model_kwargs)`` that builds the model.
- ``optimizer`` (training runs): AdamW's ``state_dict()``, full as an unsharded run has it.
- ``rng`` (training runs): each rank's RNG states in rank order (ssm_tread.train.rng.rng_state: the global
  torch and CUDA ones and the run's ``noise`` and ``routing`` generators).
- ``clock`` (training runs): the training time so far, [wall s, CPU s], evaluations, grids and checkpoints
  excluded.
- ``converted_from`` (converted official models): the absolute path of the official file.
- ``checksum``: see below; :func:`save_checkpoint` adds it. :func:`load_checkpoint` adds ``path``, the file read.

A checkpoint stores a sha256 ``checksum`` of everything else it holds (every tensor's bytes, every other
value's repr, in order); loading recomputes it, so flipped bytes that still unpickle are caught. One that
fails is named as corrupt; a resumed run then falls back to the newest good one
(:func:`load_newest_good`). One without a checksum (written before checksums, or by hand) loads with a
warning that its contents cannot be verified.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from ssm_tread.errors import UserError
from ssm_tread.files import remove_temp_files

_NAME = re.compile(r"^step-(\d+)\.pt$")
_TEMP = r"\.step-\d+\.pt\.tmp-\d+"  # save_checkpoint's temp file


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read back or whose contents do not match its checksum."""


def content_checksum(state) -> str:
    """sha256 over ``state`` in order: keys, tensors (dtype, shape, bytes) and the repr of every other value."""
    h = hashlib.sha256()

    def visit(node):
        if isinstance(node, dict):
            h.update(b"{")
            for key, value in node.items():
                h.update(repr(key).encode())
                visit(value)
            h.update(b"}")
        elif isinstance(node, (list, tuple)):
            h.update(b"[")
            for value in node:
                visit(value)
            h.update(b"]")
        elif isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
        else:
            h.update(repr(node).encode())

    visit(state)
    return h.hexdigest()


def non_finite(weights: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in weights.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save replaces it with its own text."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


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


def checkpoint_state(*, model: dict, ema: dict, step: int, config: dict, model_name: str, model_kwargs: dict,
                     optimizer: dict | None = None, rng: list | None = None, clock: list | None = None,
                     converted_from: str | None = None) -> dict:
    """The checkpoint's dict (its keys are listed at the top of this module), without the keys given as None."""
    state = {"model": model, "ema": ema, "optimizer": optimizer, "step": step, "rng": rng, "clock": clock,
             "config": config, "model_name": model_name, "model_kwargs": model_kwargs, "converted_from": converted_from}
    return {key: value for key, value in state.items() if value is not None}


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with its checksum to ``path`` atomically: a temp file, fsync, then rename over the target.

    Refuses (CheckpointError) when a tensor of ``state["model"]`` or ``state["ema"]`` is not finite, so every
    checkpoint on disk is a good one. A crash at any point leaves either the complete new file or no file
    at ``path``; the stray temp file never matches the checkpoint name pattern. A full disk raises an
    OSError (ENOSPC) that says so.
    """
    path = Path(path)
    bad = {key: names for key in ("model", "ema") if (names := non_finite(state.get(key, {})))}
    if bad:
        key, names = next(iter(bad.items()))
        newest = latest_checkpoint(path.parent)
        raise CheckpointError(f"not writing {path.name}: the {key} weights are not finite ({names[0]}"
                              f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}); the newest good "
                              f"checkpoint is {newest or 'none'}. Lower optim.lr or set optim.grad_clip, then --resume")
    state = {key: value for key, value in state.items() if key != "checksum"}  # a loaded state's old checksum
    state["checksum"] = content_checksum(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise OSError(e.errno, f"no space left on the device of {path.parent} ({free:.0f} MiB free) to write "
                          f"{path.name}; free some space and continue with --resume (the earlier checkpoints are "
                          f"intact)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def prune_checkpoints(folder: str | os.PathLike, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` (at least 1) checkpoints, sparing multiples of ``keep_every``."""
    found = list_checkpoints(folder)
    for step, path in found[:max(len(found) - max(keep_last, 1), 0)]:
        if not (keep_every and step % keep_every == 0):
            path.unlink(missing_ok=True)


def remove_partial_checkpoints(folder: str | os.PathLike, say=print) -> None:
    """Delete the temp files of checkpoint writes that a killed run left in ``folder`` (call it while holding the
    run dir, before the run writes a checkpoint)."""
    if names := remove_temp_files(folder, _TEMP):
        say(f"removed {len(names)} partial checkpoint file(s) of an interrupted write from {folder} ({names[0]})")


def _warn(line: str) -> None:
    """One warning line on stderr, from the first rank of a torchrun job only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {line}", file=sys.stderr)


def load_checkpoint(path: str | os.PathLike, warn=_warn) -> dict:
    """The state saved by :func:`save_checkpoint` from a file, or a run dir's newest checkpoint, with its
    ``path`` and its ``checksum`` (None for a checkpoint without one: ``warn`` says so). Raises
    CorruptCheckpoint when it cannot be read or does not match its checksum."""
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
    except Exception as e:  # torch's own text suggests weights_only=False: not what a torn file needs
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a checkpoint (unreadable: "
                                f"{type(e).__name__}){_earlier(path)}") from e
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"checkpoint {path} is not a checkpoint (it holds a {type(state).__name__})")
    stored = state.pop("checksum", None)  # absent in checkpoints written before checksums
    if stored is None:
        warn(f"checkpoint {path} has no checksum (written before checksums, or by hand): its contents cannot be "
             f"verified")
    elif stored != content_checksum(state):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt (its contents do not match its checksum)"
                                f"{_earlier(path)}")
    state["path"], state["checksum"] = str(path), stored
    return state


def _earlier(path: Path) -> str:
    older = [p for _, p in list_checkpoints(path.parent) if p.name < path.name]
    return f"; use an earlier one, e.g. {older[-1]}" if older else ""


def load_newest_good(folder: str | os.PathLike, say=print) -> dict | None:
    """The newest checkpoint of ``folder`` that loads and matches its checksum (None if there is none);
    ``say`` reports each corrupt one passed over and the one taken instead."""
    skipped = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except CorruptCheckpoint:
            skipped.append(path.name)
            continue
        if skipped:
            say(f"checkpoint(s) {', '.join(skipped)} in {folder} are corrupt: resuming from {path.name}, "
                f"the newest good one")
        return state
    if skipped:
        raise CheckpointError(f"every checkpoint in {folder} is corrupt ({', '.join(skipped)}): start over with "
                              f"tools/train.py --overwrite instead of --resume, or choose another train.run_dir")
    return None


def load_weights(model: torch.nn.Module, weights: dict, source: str, keep_initialised: tuple[str, ...] = ()) -> None:
    """Load a state dict, failing with the mismatching keys listed when it does not fit ``model``.

    Parameters whose names start with a prefix in ``keep_initialised`` may be missing from ``weights``;
    they keep the model's values.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not k.startswith(keep_initialised)]
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
    model.load_state_dict({**expected, **weights})
