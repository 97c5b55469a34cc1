"""Sampling: images from a trained model, sample grids, and ADM-format .npz files in restartable chunks.

The solvers themselves are the objectives' ``sample`` methods (:mod:`ssm_tread.diffusion`: ddpm, ddim and
dpm_solver in ``gaussian.py`` and ``dpm_solver.py``, euler, heun and euler_maruyama in ``flow.py``) and the
guidance is :class:`ssm_tread.diffusion.Guidance`; this module runs them over checkpoints and files.

Latent models are decoded with Stable Diffusion's VAE (``latents / scale_factor``, the scale their latent
directory records: :func:`ssm_tread.data.latents.recorded_scale`); pixel models (digits) are used as they are. Images leave here in [-1, 1] as float [N, C, H, W] or as uint8 [N, H, W, 3]
(grayscale repeated to three channels).

An .npz of samples records what its images come from, its *plan*: the checkpoint (sha256 of its contents,
EMA or raw weights), the VAE, the sampler and its settings, the guidance, the number of images, the labels,
the seed and the batch size. The chunk folder of an unfinished job holds the plan in plan.json, the
finished .npz under the key ``plan``; a restart with another plan is refused in one line naming what
differs, and a finished .npz is never overwritten (the same plan again finds it done).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ssm_tread.diffusion import Guidance, create_diffusion
from ssm_tread.diffusion.common import check_choice
from ssm_tread.machine import share
from ssm_tread.models import create_model
from ssm_tread.checkpoint import content_checksum, load_checkpoint, load_weights
from ssm_tread.data.latents import SCALE_FACTOR, recorded_scale
from ssm_tread.errors import UserError
from ssm_tread.files import check_output_path, remove_temp_files, weights_sha256
from ssm_tread.ops import allow_tf32
from ssm_tread.progress import progress_bar

SETTINGS = ("sampler", "steps", "cfg_scale", "interval", "guided_channels", "routing_guidance")
INFORMATION = ("source.checkpoint", "source.step", "source.vae")  # recorded, not compared: the sha256s are


class PlanMismatch(UserError, ValueError):
    """Samples on disk that come from another checkpoint or other settings; the message says what differs."""


def load_vae(path: str | os.PathLike, device: torch.device, scale_factor: float = SCALE_FACTOR):
    """A decoder latents [N, 4, h, w] (scaled by ``scale_factor``) -> images [N, 3, 8h, 8w] in [-1, 1], from a
    local diffusers VAE."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no VAE at {str(path)!r}: download stabilityai/sd-vae-ft-ema there "
            f"(`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}`) "
            f"or point sample.vae / --vae at a local copy")
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path)).to(device).eval()

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(vae.dtype) / scale_factor).sample.float().clamp(-1, 1)

    return decode


def make_guidance(sample_cfg: dict) -> Guidance:
    return Guidance(cfg_scale=sample_cfg["cfg_scale"], interval=sample_cfg["interval"],
                    guided_channels=sample_cfg["guided_channels"], routing=sample_cfg["routing_guidance"])


@torch.no_grad()
def generate(model, diffusion, labels: torch.Tensor, noise: torch.Tensor, sample_cfg: dict, decode=None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample images for ``labels`` [N] from ``noise`` [N, C, H, W]; returns float [N, C', H', W'] in [-1, 1]."""
    out = diffusion.sample(model, noise, {"y": labels}, sampler=sample_cfg["sampler"], steps=sample_cfg["steps"],
                           guidance=make_guidance(sample_cfg), generator=generator)
    return decode(out) if decode is not None else out.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (one channel is repeated to three)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str | os.PathLike, ncol: int, min_size: int = 64) -> None:
    """A PNG grid of ``images`` [N, C, H, W] in [-1, 1], ``ncol`` per row; small images are enlarged."""
    from PIL import Image

    pixels = to_uint8(images)  # [N, H, W, 3]
    n, h, w, _ = pixels.shape
    zoom = max(1, math.ceil(min_size / h))
    pixels = pixels.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w, pad = h * zoom, w * zoom, 2
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def noise_shape(model) -> tuple[int, int, int]:
    """[C, H, W] of one sample's starting noise: the model's input."""
    size = model.input_size if isinstance(model.input_size, tuple) else (model.input_size, model.input_size)
    return (model.in_channels, *size)


def grid_labels(classes: list[int], per_class: int, device) -> torch.Tensor:
    """Labels of a grid with one block of ``per_class`` samples per class, class after class."""
    return torch.tensor(classes, device=device).repeat_interleave(per_class)


def load_for_sampling(checkpoint: str | os.PathLike, device: torch.device, use_ema: bool | None = None):
    """(model in eval mode on ``device``, diffusion, the run's resolved config) from a checkpoint file or run dir,
    with the EMA weights (``use_ema``; None: as the run's ``sample.use_ema`` says) or the raw ones."""
    return load_with_source(checkpoint, device, use_ema)[:3]


def load_with_source(checkpoint: str | os.PathLike, device: torch.device, use_ema: bool | None = None):
    """:func:`load_for_sampling` and the source, what the samples come from: the checkpoint, its step, the
    sha256 of its contents (computed for a checkpoint saved without one) and the weights ("ema" or "raw")."""
    state = load_checkpoint(checkpoint)
    cfg = state["config"]
    use_ema = cfg["sample"]["use_ema"] if use_ema is None else use_ema
    model = create_model(state["model_name"], **state["model_kwargs"])
    key = "ema" if use_ema else "model"
    load_weights(model, state[key], f"{key} weights of {state['path']}")
    diffusion = create_diffusion(cfg["diffusion"]["objective"], **cfg["diffusion"]["kwargs"])
    checksum = state["checksum"] or content_checksum({k: v for k, v in state.items() if k not in ("path", "checksum")})
    source = {"checkpoint": state["path"], "step": state.get("step"), "sha256": checksum,
              "weights": "ema" if use_ema else "raw"}
    return model.to(device).eval(), diffusion, cfg, source


def make_labels(num_images: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """``num_images`` labels: "random" (uniform) or "balanced" (each class equally often, shuffled).

    An unconditional model (``num_classes=0``) gets zeros, which it ignores.
    """
    generator = torch.Generator().manual_seed(seed)
    if mode not in ("random", "balanced"):
        raise ValueError(f"unknown label mode {mode!r}; choose 'random' or 'balanced'")
    if num_classes == 0:
        return torch.zeros(num_images, dtype=torch.long)
    if mode == "random":
        return torch.randint(0, num_classes, (num_images,), generator=generator)
    return (torch.arange(num_images) % num_classes)[torch.randperm(num_images, generator=generator)]


def chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    """The generator of one chunk: its noise does not depend on the number of ranks or on restarts."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + chunk)


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sample_plan(model, labels: torch.Tensor, batch_size: int, sample_cfg: dict, seed: int,
                source: dict | None = None) -> dict:
    """What a set of samples comes from (see the module docstring), as JSON values."""
    plan = {"source": source, "sample": {k: sample_cfg[k] for k in SETTINGS}, "num_images": len(labels),
            "labels_sha256": hashlib.sha256(labels.cpu().numpy().astype(np.int64).tobytes()).hexdigest(),
            "seed": seed, "batch_size": batch_size, "conditional": model.num_classes > 0}
    return json.loads(json.dumps(plan))


def plan_differences(recorded: dict, plan: dict) -> list[str]:
    """The entries in which two plans differ, as "key recorded -> now" (short for checksums)."""
    def flat(d, prefix=""):
        items = {}
        for k, v in (d or {}).items():
            items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return items

    def show(v):
        return v[:12] if isinstance(v, str) and len(v) == 64 else v

    old, new = flat(recorded), flat(plan)
    keys = [k for k in {**old, **new} if k not in INFORMATION and old.get(k) != new.get(k)]
    return [f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in keys]


def _refuse_other_plan(what: str, recorded: dict, plan: dict, fix: str) -> None:
    if differences := plan_differences(recorded, plan):
        raise PlanMismatch(f"{what} of another plan (recorded -> now: {'; '.join(differences)}); {fix}")


def sample_chunks(model, diffusion, out: str | os.PathLike, labels: torch.Tensor, batch_size: int, sample_cfg: dict,
                  seed: int, decode=None, rank: int = 0, world: int = 1, progress: bool = False,
                  source: dict | None = None) -> Path:
    """Sample one image per label into ``<out>.chunks/chunk-NNNNNN.npz``, chunk i on rank i % world.

    Chunks already on disk are skipped, so a restarted job continues where it stopped. The chunk folder
    records the plan (:func:`sample_plan`; ``source``: what :func:`load_with_source` returns) and refuses,
    naming what differs, to mix in chunks of another. The temp files of this rank's chunks that a killed job
    left are removed.
    """

    folder = Path(str(out) + ".chunks")
    plan = sample_plan(model, labels, batch_size, sample_cfg, seed, source)
    plan_path = folder / "plan.json"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not plan_path.exists():
            plan_path.write_text(json.dumps(plan))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    _refuse_other_plan(f"{folder} holds chunks", json.loads(plan_path.read_text()), plan,
                       f"sample with the checkpoint and settings it records, or delete {folder} to start over")
    device = next(model.parameters()).device
    shape = noise_shape(model)
    mine = range(rank, math.ceil(len(labels) / batch_size), world)
    if mine:
        remove_temp_files(folder, rf"\.chunk-({'|'.join(f'{i:06d}' for i in mine)})\.npz\.tmp-\d+")
    for i in progress_bar(mine, enabled=progress, desc="chunks"):
        path = folder / f"chunk-{i:06d}.npz"
        if path.exists():
            continue
        y = labels[i * batch_size:(i + 1) * batch_size].to(device)
        generator = chunk_generator(seed, i, device)
        noise = torch.randn((len(y), *shape), generator=generator, device=device)
        images = generate(model, diffusion, y, noise, sample_cfg, decode, generator)
        _save_npz_atomic(path, images=to_uint8(images), labels=y.cpu().numpy())
    return folder


def merge_chunks(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Stream every chunk of ``folder`` into one ADM-format .npz: ``arr_0`` uint8 [N, H, W, 3], ``arr_1`` labels
    (absent for an unconditional model), and ``plan``, the plan as a JSON string."""
    folder, out = Path(folder), Path(out)
    plan = json.loads((folder / "plan.json").read_text())
    count = math.ceil(plan["num_images"] / plan["batch_size"])
    paths = [folder / f"chunk-{i:06d}.npz" for i in range(count)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} chunks missing in {folder} (e.g. {missing[0]}); run the sampling again")
    first = np.load(paths[0])["images"]
    shape = (plan["num_images"], *first.shape[1:])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for path in paths:
                f.write(np.ascontiguousarray(np.load(path)["images"]).tobytes())
        if plan["conditional"]:
            with archive.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.concatenate([np.load(path)["labels"] for path in paths]))
        with archive.open("plan.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(json.dumps(plan)))
    os.replace(tmp, out)
    return out


def recorded_plan(path: str | os.PathLike) -> dict | None:
    """The plan a finished .npz of samples records (None if it records none or cannot be read)."""
    try:
        with np.load(path) as data:
            return json.loads(str(data["plan"])) if "plan" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _setup(checkpoint, sample_overrides: dict, use_ema: bool | None, device: torch.device):
    if device.type == "cuda":
        allow_tf32()
    model, diffusion, cfg, source = load_with_source(checkpoint, device, use_ema)
    sample_cfg = {**cfg["sample"], **{k: v for k, v in sample_overrides.items() if v is not None}}
    sample_cfg["sampler"] = sample_cfg["sampler"] or diffusion.default_sampler
    check_choice("sampler", sample_cfg["sampler"], diffusion.samplers)
    make_guidance(sample_cfg)  # raises for a bad interval or routing guidance
    if model.num_classes == 0 and sample_cfg["cfg_scale"] != 1.0:
        raise ValueError(f"cfg scale {sample_cfg['cfg_scale']}: the model is unconditional (no classes), so there "
                         f"is nothing to guide towards; sample with --cfg-scale 1")
    decode = None
    if cfg["data"]["name"] == "latents":
        decode = load_vae(sample_cfg["vae"], device, recorded_scale(cfg["data"]["root"]))
        source.update(vae=str(Path(sample_cfg["vae"]).resolve()), vae_sha256=weights_sha256(sample_cfg["vae"]))
    return model, diffusion, sample_cfg, decode, source


def sample_grid_file(checkpoint, out: str | os.PathLike, classes: list[int] | None, per_class: int,
                     sample_overrides: dict | None = None, use_ema: bool | None = None, device: str | None = None,
                     num_images: int | None = None, label_mode: str = "random") -> Path:
    """A PNG with one row of ``per_class`` samples per class in ``classes``; or, with ``classes=None``,
    ``num_images`` samples in rows of ``per_class``, their labels drawn as :func:`make_labels`'s ``label_mode``
    says (the only grid of an unconditional model)."""
    if (classes is None) == (num_images is None):
        raise ValueError("a grid needs either classes or a number of images")
    check_output_path(out, "--out", (".png",))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, diffusion, sample_cfg, decode, _ = _setup(checkpoint, sample_overrides or {}, use_ema, device)
    if classes is None:
        labels = make_labels(num_images, model.num_classes, label_mode, sample_cfg["seed"]).to(device)
    elif model.num_classes == 0:
        raise ValueError("the model is unconditional (no classes): ask for a number of images instead "
                         "(tools/sample.py --num-images N)")
    elif bad := [c for c in classes if not 0 <= c < model.num_classes]:
        raise ValueError(f"classes {bad} out of range: the model has classes 0..{model.num_classes - 1}")
    else:
        labels = grid_labels(classes, per_class, device)
    generator = torch.Generator(device).manual_seed(sample_cfg["seed"])
    shape = noise_shape(model)
    images = []
    for y in labels.split(sample_cfg["batch_size"]):
        noise = torch.randn((len(y), *shape), generator=generator, device=device)
        images.append(generate(model, diffusion, y, noise, sample_cfg, decode, generator))
    save_grid(torch.cat(images), out, per_class)
    return Path(out)


def sample_npz_file(checkpoint, out: str | os.PathLike, num_images: int, labels: str = "random",
                    sample_overrides: dict | None = None, use_ema: bool | None = None, progress: bool = True,
                    say=print) -> Path | None:
    """``num_images`` samples into an ADM-format .npz, on every rank of a torchrun job (or one process).

    Each rank samples its chunks into ``<out>.chunks/`` (a restart skips the finished ones); rank 0
    merges them into ``out``, removes the chunk folder and says so. A finished ``out`` of the same plan is
    left as it is (said); one of another plan, or one that records none, is refused (:class:`PlanMismatch`).
    Returns ``out`` on rank 0, None elsewhere.
    """
    import shutil

    from accelerate import PartialState

    out = check_output_path(out, "--out", (".npz",))
    state = PartialState(cpu=not torch.cuda.is_available())
    model, diffusion, sample_cfg, decode, source = _setup(checkpoint, sample_overrides or {}, use_ema, state.device)
    if not (sample_overrides or {}).get("batch_size"):  # the config's batch, cut so that every rank gets chunks
        sample_cfg["batch_size"] = share(sample_cfg["batch_size"], num_images, state.num_processes)
    y = make_labels(num_images, model.num_classes, labels, sample_cfg["seed"])
    if out.exists():
        recorded = recorded_plan(out)
        if recorded is None:
            raise PlanMismatch(f"{out} exists and records no plan (written by another tool, an older version, or "
                               f"not an .npz): delete it or choose another --out")
        _refuse_other_plan(f"{out} already holds {recorded['num_images']} samples", recorded,
                           sample_plan(model, y, sample_cfg["batch_size"], sample_cfg, sample_cfg["seed"], source),
                           "delete it or choose another --out")
        if state.is_main_process:
            say(f"{out} already holds these samples (same checkpoint and settings): nothing to do")
        return out if state.is_main_process else None
    if state.is_main_process:
        remove_temp_files(out.parent, rf"\.{re.escape(out.name)}\.tmp-\d+")  # of a killed merge
    folder = sample_chunks(model, diffusion, out, y, sample_cfg["batch_size"], sample_cfg, sample_cfg["seed"], decode,
                           state.process_index, state.num_processes, progress and state.is_main_process, source)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    merge_chunks(folder, out)
    shutil.rmtree(folder)
    say(f"wrote {out}")
    return out
