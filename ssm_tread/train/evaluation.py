"""FID of the EMA model during training (``eval.every``) and after it (``eval.num_samples``).

An evaluation samples ``eval.num_samples`` class-balanced images (class after class) with the run's
``sample`` settings, decodes latents with the VAE, and takes the Frechet distance between their features
and reference statistics computed once at the start:

- latent models (ImageNet): TF-FID Inception pool_3 features (``eval.inception``) against the ADM reference
  batch ``eval.reference``: its stored mu/sigma, else the statistics of its images;
- digits, MNIST: the data set's bundled classifier's features against all 1,797 digits or MNIST's 4,000
  training images, plus class accuracy.

Evaluations draw only from their own generators and restore torch's global ones (building the
evaluator, label dropout): a run's training losses do not depend on ``eval.*``. The noise is fixed:
chunk i of ``sample.batch_size`` samples draws from its own generator on rank i % world, so every
evaluation of a run, on any number of ranks, sees the same noise and labels. The
ranks gather their features (all_gather); rank 0 computes the metrics and logs them as ``eval/<name>``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ssm_tread.eval import (
    DigitsEvaluator,
    InceptionFeatures,
    feature_statistics,
    frechet_distance_of,
    load_inception,
)
from ssm_tread.eval.adm import NpzImages, reference_batch, reference_statistics
from ssm_tread.eval.features import compute_features
from ssm_tread.eval.inception import INCEPTION_URL
from ssm_tread.progress import progress_bar, write
from ssm_tread.sampling import chunk_generator, generate, to_uint8
from ssm_tread.train.config import ConfigError, grid_classes
from ssm_tread.train.distributed import gather_objects
from ssm_tread.train.rng import isolated_rng


def check_eval_config(cfg: dict) -> None:
    """Refuse, before anything is built, eval settings that could not run (the VAE is checked when it loads)."""
    ec = cfg["eval"]
    if ec["every"] and not ec["num_samples"]:
        raise ConfigError(f"eval.every={ec['every']}: needs the number of samples per evaluation; set "
                          f"eval.num_samples (e.g. 5000 for ImageNet, 200 for the digits)")
    if not ec["num_samples"]:
        return
    if ec["num_samples"] < 2:
        raise ConfigError(f"eval.num_samples={ec['num_samples']}: FID needs at least 2 samples; set eval.num_samples "
                          f"to 2 or more, or 0 for no evaluation")
    if cfg["data"]["name"] != "latents":
        if ec["reference"]:
            raise ConfigError(f"eval.reference={ec['reference']!r}: is for latent models (the digits are compared "
                              f"with the bundled digits); set eval.reference=None")
        return
    name, url = reference_batch(ec["reference"])  # the reference named, else ImageNet-256's
    if not ec["reference"]:
        raise ConfigError(f"eval.reference=None: evaluating a latent model needs reference statistics; download the "
                          f"ADM reference batch (wget -O checkpoints/{name} {url}) and set "
                          f"eval.reference=checkpoints/{name} (at 512: {reference_batch(image_size=512)[0]}), or "
                          f"turn evaluation off with eval.num_samples=0 eval.every=0")
    if not Path(ec["reference"]).is_file():
        raise ConfigError(f"eval.reference={ec['reference']!r}: not found; download the ADM reference batch there "
                          f"(wget -O {ec['reference']} {url}) or point eval.reference at a local copy")
    if not Path(ec["inception"]).is_file():
        raise ConfigError(f"eval.inception={ec['inception']!r}: not found; download the FID Inception weights there "
                          f"(wget -O {ec['inception']} {INCEPTION_URL}) or point eval.inception at a local copy")


class Evaluation:
    """``evaluation(model, step)`` on every rank: samples the fixed evaluation set with ``model`` (eval mode),
    scores it, logs ``eval/<name>`` to ``metrics`` and returns the metrics on rank 0 (None elsewhere).
    A second call at the same step returns the first result. ``evaluation(model, step, interruptible)``
    samples through ``interruptible(work)``, which returns None when it abandons the work (a stop signal):
    then every rank abandons the evaluation and returns None."""

    def __init__(self, cfg: dict, num_classes: int, shape: tuple, diffusion, device, decode=None, metrics=None,
                 rank: int = 0, world: int = 1):
        with isolated_rng(device):
            self._setup(cfg, num_classes, shape, diffusion, device, decode, metrics, rank, world)

    def _setup(self, cfg, num_classes, shape, diffusion, device, decode, metrics, rank, world):
        ec, self.sample_cfg = cfg["eval"], cfg["sample"]
        self.shape, self.diffusion, self.device, self.decode = shape, diffusion, device, decode
        self.metrics, self.rank, self.world = metrics, rank, world
        self.latent = cfg["data"]["name"] == "latents"
        self.progress = rank == 0 and cfg["log"]["progress"]
        n = ec["num_samples"]
        self.labels = torch.arange(n) * num_classes // n
        self.grid_classes = grid_classes(self.sample_cfg, num_classes)
        self.seed = self.sample_cfg["seed"] + 1  # other noise than the sample grids'
        if self.latent:
            try:
                inception = load_inception(ec["inception"])
            except ValueError as e:
                raise ConfigError(f"eval.inception: {e}") from None
            self.extractor = InceptionFeatures(device=device, model=inception)
            self.reference = self._reference(ec["reference"]) if rank == 0 else None
        else:
            digits = DigitsEvaluator(ec["weights"], device, dataset=cfg["data"]["name"])
            self.extractor, self.reference = digits.extractor, digits.reference
        self.step, self.result, self.images = None, None, None

    def _reference(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        stats = reference_statistics(path, ["mu", "sigma"])
        if stats is None:
            images = NpzImages(path)
            if not images.present:
                raise ConfigError(f"eval.reference={path!r} has neither statistics mu/sigma nor images arr_0 (it has "
                                  f"{images.keys}); use the ADM reference batch ({reference_batch(path)[1]})")
            batch = self.sample_cfg["batch_size"]
            features = compute_features(self.extractor, images.batches(batch), images.num_batches(batch),
                                        self.progress, desc="reference features")
            stats = feature_statistics(features["pool"])
        if stats[0].shape != (2048,):
            raise ConfigError(f"eval.reference={path!r}: mu has shape {stats[0].shape}, not the (2048,) of Inception "
                              f"pool_3 features; use the ADM reference batch ({reference_batch(path)[1]})")
        return stats

    def _features(self, images: torch.Tensor) -> dict:
        if self.latent:
            return {"features": self.extractor.features(to_uint8(images))["pool"]}
        return self.extractor.features(images)  # {"features", "logits"}

    @torch.no_grad()
    def __call__(self, model, step: int, interruptible=None) -> dict | None:
        if step == self.step:
            return self.result
        with isolated_rng(self.device):
            return self._evaluate(model, step, interruptible or (lambda work, *args: work(*args)))

    def _sample(self, model, step: int) -> list:
        """This rank's chunks: [(chunk index, features, digits: the images)]."""
        batch = self.sample_cfg["batch_size"]
        chunks = range(self.rank, math.ceil(len(self.labels) / batch), self.world)
        mine = []
        for i in progress_bar(chunks, enabled=self.progress, desc=f"eval at step {step}", leave=False, dynamic_ncols=True):
            y = self.labels[i * batch:(i + 1) * batch].to(self.device)
            generator = chunk_generator(self.seed, i, self.device)
            noise = torch.randn((len(y), *self.shape), generator=generator, device=self.device)
            images = generate(model, self.diffusion, y, noise, self.sample_cfg, self.decode, generator)
            mine.append((i, self._features(images), None if self.latent else images.cpu()))
        return mine

    def _evaluate(self, model, step: int, interruptible) -> dict | None:
        every_rank = gather_objects(interruptible(self._sample, model, step), self.world)
        if any(mine is None for mine in every_rank):
            return None  # a stop signal abandoned it
        parts = sorted((part for mine in every_rank for part in mine), key=lambda part: part[0])
        self.step, self.result = step, None
        if self.rank != 0:
            return None
        features = {k: np.concatenate([f[k].numpy() for _, f, _ in parts]) for k in parts[0][1]}
        self.result = {"fid": frechet_distance_of(features["features"], *self.reference)}
        if "logits" in features:
            self.result["accuracy"] = float((features["logits"].argmax(1) == self.labels.numpy()).mean())
        if not self.latent:
            self.images = torch.cat([images for _, _, images in parts])
        if self.metrics is not None:
            self.metrics.log(step, {f"eval/{k}": v for k, v in self.result.items()})
        write(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.result.items()))
        return self.result

    def final(self, model, step: int, run_dir: Path) -> tuple[dict | None, torch.Tensor | None]:
        """The evaluation after training (reusing the one of this step): writes eval.json on rank 0 and
        returns (metrics, digits: the final grid cut from the samples, the first ``sample.grid_per_class``
        of each class in ``sample.grid_classes``); (None, None) on the other ranks."""
        result = self(model, step)
        if self.rank != 0:
            return None, None
        (run_dir / "eval.json").write_text(json.dumps({"step": step, **result}, indent=2) + "\n")
        if self.latent:
            return result, None
        sc = self.sample_cfg
        grid = torch.cat([self.images[self.labels == c][:sc["grid_per_class"]] for c in self.grid_classes])
        return result, grid
