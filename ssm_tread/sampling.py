"""Sampling: images from a trained model, sample grids, and ADM-format .npz files in restartable chunks.

Latent models are decoded with Stable Diffusion's VAE (``latents / 0.18215``); pixel models (digits)
are used as they are. Images leave here in [-1, 1] as float [N, C, H, W] or as uint8 [N, H, W, 3]
(grayscale repeated to three channels).
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ssm_tread.diffusion import Guidance, create_diffusion
from ssm_tread.diffusion.common import check_choice
from ssm_tread.models import create_model
from ssm_tread.ops import allow_tf32
from ssm_tread.checkpoint import load_checkpoint, load_weights
from ssm_tread.progress import progress_bar

LATENT_SCALE = 0.18215


def load_vae(path: str | os.PathLike, device: torch.device):
    """A decoder latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [-1, 1], from a local diffusers VAE."""
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
        return vae.decode(latents.to(vae.dtype) / LATENT_SCALE).sample.float().clamp(-1, 1)

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


def load_for_sampling(checkpoint: str | os.PathLike, device: torch.device, use_ema: bool = True):
    """(model in eval mode on ``device``, diffusion, the run's resolved config) from a checkpoint file or run dir."""
    state = load_checkpoint(checkpoint)
    cfg = state["config"]
    model = create_model(state["model_name"], **state["model_kwargs"])
    key = "ema" if use_ema else "model"
    load_weights(model, state[key], f"{key} weights of {state['path']}")
    diffusion = create_diffusion(cfg["diffusion"]["objective"], **cfg["diffusion"]["kwargs"])
    return model.to(device).eval(), diffusion, cfg


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


def sample_chunks(model, diffusion, out: str | os.PathLike, labels: torch.Tensor, batch_size: int, sample_cfg: dict,
                  seed: int, decode=None, rank: int = 0, world: int = 1, progress: bool = False) -> Path:
    """Sample one image per label into ``<out>.chunks/chunk-NNNNNN.npz``, chunk i on rank i % world.

    Chunks already on disk are skipped, so a restarted job continues where it stopped. The chunk folder
    records the settings it was made with and refuses to mix in chunks of other settings.
    """

    folder = Path(str(out) + ".chunks")
    plan = {"num_images": len(labels), "batch_size": batch_size, "seed": seed, "labels": labels.tolist(),
            "conditional": model.num_classes > 0,
            "sample": {k: sample_cfg[k] for k in ("sampler", "steps", "cfg_scale", "interval",
                                                  "guided_channels", "routing_guidance")}}
    plan_path = folder / "plan.json"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not plan_path.exists():
            plan_path.write_text(json.dumps(plan))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if json.loads(json.dumps(plan)) != json.loads(plan_path.read_text()):
        raise ValueError(f"{folder} holds chunks sampled with other settings; delete it or choose another output path")
    device = next(model.parameters()).device
    shape = noise_shape(model)
    mine = range(rank, math.ceil(len(labels) / batch_size), world)
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
    (absent for an unconditional model)."""
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
                np.lib.format.write_array(f, np.asarray(plan["labels"], dtype=np.int64))
    os.replace(tmp, out)
    return out


def _setup(checkpoint, sample_overrides: dict, use_ema: bool, device: torch.device):
    if device.type == "cuda":
        allow_tf32()
    model, diffusion, cfg = load_for_sampling(checkpoint, device, use_ema)
    sample_cfg = {**cfg["sample"], **{k: v for k, v in sample_overrides.items() if v is not None}}
    check_choice("sampler", sample_cfg["sampler"] or diffusion.default_sampler, diffusion.samplers)
    make_guidance(sample_cfg)  # raises for a bad interval or routing guidance
    if model.num_classes == 0 and sample_cfg["cfg_scale"] != 1.0:
        raise ValueError(f"cfg scale {sample_cfg['cfg_scale']}: the model is unconditional (no classes), so there "
                         f"is nothing to guide towards; sample with --cfg-scale 1")
    decode = load_vae(sample_cfg["vae"], device) if cfg["data"]["name"] == "latents" else None
    return model, diffusion, sample_cfg, decode


def sample_grid_file(checkpoint, out: str | os.PathLike, classes: list[int] | None, per_class: int,
                     sample_overrides: dict | None = None, use_ema: bool = True, device: str | None = None,
                     num_images: int | None = None, label_mode: str = "random") -> Path:
    """A PNG with one row of ``per_class`` samples per class in ``classes``; or, with ``classes=None``,
    ``num_images`` samples in rows of ``per_class``, their labels drawn as :func:`make_labels`'s ``label_mode``
    says (the only grid of an unconditional model)."""
    if (classes is None) == (num_images is None):
        raise ValueError("a grid needs either classes or a number of images")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, diffusion, sample_cfg, decode = _setup(checkpoint, sample_overrides or {}, use_ema, device)
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
                    sample_overrides: dict | None = None, use_ema: bool = True, progress: bool = True) -> Path | None:
    """``num_images`` samples into an ADM-format .npz, on every rank of a torchrun job (or one process).

    Each rank samples its chunks into ``<out>.chunks/`` (a restart skips the finished ones); rank 0
    merges them into ``out`` and removes the chunk folder. Returns ``out`` on rank 0, None elsewhere.
    """
    import shutil

    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    model, diffusion, sample_cfg, decode = _setup(checkpoint, sample_overrides or {}, use_ema, state.device)
    y = make_labels(num_images, model.num_classes, labels, sample_cfg["seed"])
    folder = sample_chunks(model, diffusion, out, y, sample_cfg["batch_size"], sample_cfg, sample_cfg["seed"], decode,
                           state.process_index, state.num_processes, progress and state.is_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    merge_chunks(folder, out)
    shutil.rmtree(folder)
    return Path(out)
