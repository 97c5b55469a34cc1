"""Evaluation during training (eval.every): the steps it runs at, its FID against independent computations
from the checkpoints, reference statistics, the split over two gloo processes, and the errors for missing files."""
import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import save_tiny_vae
from PIL import Image
from test_train import tiny, torchrun_train

from ssm_tread.data.extract import extract_latents
from ssm_tread.eval import DigitsEvaluator, FIDInceptionV3
from ssm_tread.sampling import generate, load_for_sampling
from ssm_tread.train.config import ConfigError
from ssm_tread.train.evaluation import Evaluation
from ssm_tread.train.trainer import train


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def latents(vae_dir, tmp_path_factory):
    """Six random 16x16 images of two classes as 4x8x8 latent shards."""
    images, out = tmp_path_factory.mktemp("imagefolder"), tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee"):
        (images / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    assert extract_latents(str(images), str(out), vae_dir, image_size=16, batch_size=6, shard_size=6, num_workers=0,
                           progress=False) is not None
    return str(out)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A random FIDInceptionV3 (He-initialised convolutions, so that pool features vary with the image) and the
    .pth file of its weights that load_inception accepts."""
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An ADM-style reference batch with stored mu/sigma and images whose statistics are different."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2048, 8)) * 0.01
    mu, sigma = rng.uniform(0.2, 0.3, 2048), a @ a.T + 1e-4 * np.eye(2048)
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), mu=mu, sigma=sigma)
    return str(path), mu, sigma


def latent_run(run_dir, latents, vae_dir, *overrides):
    return tiny(run_dir, "data.name=latents", f"data.root={latents}", f"sample.vae={vae_dir}", *overrides)


def eval_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "eval/fid" in r}


def eval_set(checkpoint, decode=None):
    """The evaluation samples as documented: labels class after class; chunk i of sample.batch_size draws
    noise and sampler randomness from a generator seeded (sample.seed + 1) * 1_000_003 + i."""
    model, diffusion, cfg = load_for_sampling(checkpoint, torch.device("cpu"))
    sc, n = cfg["sample"], cfg["eval"]["num_samples"]
    labels = torch.arange(n) * model.num_classes // n
    images = []
    for i, y in enumerate(labels.split(sc["batch_size"])):
        generator = torch.Generator().manual_seed((sc["seed"] + 1) * 1_000_003 + i)
        noise = torch.randn((len(y), model.in_channels, model.input_size, model.input_size), generator=generator)
        images.append(generate(model, diffusion, y, noise, sc, decode, generator))
    return torch.cat(images), labels


def fid_with_sqrtm(features, mu, sigma):
    """Closed-form Frechet distance of features [n, D] to (mu, sigma) with scipy's sqrtm. With X the centred
    features, S1 = X^T X / (n-1) and S1 sigma share their nonzero eigenvalues with X sigma X^T / (n-1), so
    tr sqrtm(S1 sigma) = tr sqrtm(X sigma X^T / (n-1)), an n x n matrix."""
    x = features - features.mean(0)
    covmean = scipy.linalg.sqrtm(x @ sigma @ x.T / (len(x) - 1))
    diff = features.mean(0) - mu
    return diff @ diff + np.trace(np.cov(features, rowvar=False)) + np.trace(sigma) - 2 * np.trace(covmean).real


def test_digits_are_evaluated_every_n_steps_and_after_training(tmp_path):
    summary = train(tiny(tmp_path, "train.steps=4", "eval.every=2", "eval.num_samples=20", "sample.batch_size=8"))
    evals = eval_rows(tmp_path)
    assert list(evals) == [2, 4]  # the evaluation after training is the one of step 4, logged once
    final = {"fid": evals[4]["eval/fid"], "accuracy": evals[4]["eval/accuracy"]}
    assert summary["eval"] == final
    assert json.loads((tmp_path / "eval.json").read_text()) == {"step": 4, **final}
    assert (tmp_path / "samples.png").is_file()
    evaluator = DigitsEvaluator()
    for step in (2, 4):
        expected = evaluator.evaluate(*eval_set(tmp_path / "checkpoints" / f"step-{step:07d}.pt"))
        assert evals[step]["eval/fid"] == pytest.approx(expected["fid"], rel=1e-6)
        assert evals[step]["eval/accuracy"] == expected["accuracy"]
    assert evals[2]["eval/fid"] != evals[4]["eval/fid"]


@pytest.mark.parametrize("scale", [0.18215, 0.5])
def test_latent_model_fid_matches_an_independent_computation(tmp_path, latents, vae_dir, inception, reference, scale):
    """Decoded with the scale the latents' index records (0.5: another VAE's), the one the dataset multiplied by."""
    from diffusers import AutoencoderKL
    model, inception_path = inception
    ref_path, mu, sigma = reference
    if scale != 0.18215:
        latents = shutil.copytree(latents, tmp_path / "latents")
        index = json.loads((latents / "index.json").read_text())
        (latents / "index.json").write_text(json.dumps({**index, "scale_factor": scale}))
    train(latent_run(tmp_path, latents, vae_dir, "train.steps=2", "eval.every=2", "eval.num_samples=4",
                     "sample.batch_size=3", f"eval.reference={ref_path}", f"eval.inception={inception_path}"))
    evals = eval_rows(tmp_path)
    assert list(evals) == [2] and set(evals[2]) == {"step", "eval/fid"} and math.isfinite(evals[2]["eval/fid"])
    assert json.loads((tmp_path / "eval.json").read_text()) == {"step": 2, "fid": evals[2]["eval/fid"]}

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        images, _ = eval_set(tmp_path / "checkpoints" / "step-0000002.pt",
                             decode=lambda z: vae.decode(z / scale).sample.clamp(-1, 1))
        pixels = ((images + 1) * 127.5).round()  # uint8 values, as the samples of an ADM .npz
        features = model(pixels)["pool"].double().numpy()
    assert images.shape == (4, 3, 16, 16)
    assert evals[2]["eval/fid"] == pytest.approx(fid_with_sqrtm(features, mu, sigma), rel=1e-5)


def test_reference_statistics_come_from_the_images_when_none_are_stored(tmp_path, inception):
    model, inception_path = inception
    images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", images)
    cfg = tiny(tmp_path, "data.name=latents", "eval.num_samples=4", f"eval.reference={tmp_path / 'ref.npz'}",
               f"eval.inception={inception_path}")
    mu, sigma = Evaluation(cfg, 2, (4, 8, 8), None, torch.device("cpu")).reference
    with torch.no_grad():
        features = model(torch.from_numpy(images).permute(0, 3, 1, 2).float())["pool"].double().numpy()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-9)


def test_missing_files_fail_before_training_and_say_what_to_download(tmp_path, latents, vae_dir, inception,
                                                                     reference):
    inception_path, ref_path = inception[1], reference[0]
    on = ["eval.every=2", "eval.num_samples=4"]
    cases = [
        ([], r"needs reference statistics; download the ADM reference batch .*VIRTUAL_imagenet256_labeled.npz"),
        ([f"eval.reference={tmp_path / 'ref.npz'}"], r"eval.reference='.*ref.npz': not found; download .*wget -O"),
        ([f"eval.reference={ref_path}", f"eval.inception={tmp_path / 'inc.pth'}"],
         r"eval.inception='.*inc.pth': not found; download .*pt_inception-2015-12-05"),
        ([f"eval.reference={ref_path}", f"eval.inception={inception_path}", f"sample.vae={tmp_path / 'vae'}"],
         r"no VAE at .*download stabilityai/sd-vae-ft-ema.*sample.vae.*eval.num_samples=0"),
    ]
    for i, (overrides, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(ConfigError, match=message):
            train(latent_run(run_dir, latents, vae_dir, *on, *overrides))
        assert not list(run_dir.glob("checkpoints/*.pt"))
    np.savez(tmp_path / "empty.npz", labels=np.zeros(3))
    with pytest.raises(ConfigError, match="neither statistics mu/sigma nor images arr_0"):
        train(latent_run(tmp_path / "empty", latents, vae_dir, *on, f"eval.reference={tmp_path / 'empty.npz'}",
                         f"eval.inception={inception_path}"))
    with pytest.raises(ConfigError, match="eval.every=2: needs the number of samples per evaluation"):
        train(tiny(tmp_path / "digits", "eval.every=2"))


def test_two_gloo_processes_evaluate_the_same_samples_as_one(tmp_path):
    same = ["model.class_dropout_prob=0.0", "sample.cfg_scale=1.0", "routing.routes=[]", "train.steps=2",
            "eval.every=2", "eval.num_samples=10", "sample.batch_size=3", "sample.grid_per_class=1"]
    train(tiny(tmp_path / "one", *same))
    torchrun_train(tmp_path / "two", *same)
    one, two = eval_rows(tmp_path / "one")[2], eval_rows(tmp_path / "two")[2]
    assert two["eval/fid"] == pytest.approx(one["eval/fid"], rel=1e-4)
    assert two["eval/accuracy"] == one["eval/accuracy"]
