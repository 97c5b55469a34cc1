"""The digits evaluator: shipped classifier weights, held-out accuracy, digits FID, determinism, errors."""
import os

import numpy as np
import pytest
import torch

from ssm_tread.data import load_digits_tensors
from ssm_tread.eval import DigitsEvaluator, DigitsFeatures, FeatureExtractor, compute_features, load_digits_classifier
from ssm_tread.eval.digits import (
    DEFAULT_WEIGHTS,
    holdout_split,
    reference_statistics,
    save_digits_classifier,
    train_digits_classifier,
)


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


def test_weights_shipped_and_small():
    assert os.path.isfile(DEFAULT_WEIGHTS) and os.path.getsize(DEFAULT_WEIGHTS) < 2 * 1024 * 1024


def test_heldout_accuracy():
    model, metrics = load_digits_classifier()
    x, y = load_digits_tensors()
    _, test_idx = holdout_split(len(y), metrics["heldout"], metrics["seed"])
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).double().mean().item()
    assert len(test_idx) == 359 and acc > 0.9
    assert acc == pytest.approx(metrics["heldout_accuracy"])


def test_real_digits_score_well(evaluator):
    x, y = load_digits_tensors()
    r = evaluator.evaluate(x, y)
    assert set(r) == {"fid", "accuracy"}
    assert abs(r["fid"]) < 1e-2 and r["accuracy"] > 0.99
    wrong = evaluator.evaluate(x, (y + 1) % 10)
    assert wrong["accuracy"] < 0.05 and wrong["fid"] == pytest.approx(r["fid"], abs=1e-9)


def test_noise_scores_badly(evaluator):
    x, y = load_digits_tensors()
    torch.manual_seed(0)
    real = evaluator.evaluate(x[:600], y[:600])
    noise = evaluator.evaluate(torch.rand(600, 1, 16, 16) * 2 - 1, y[:600])
    blurred = evaluator.evaluate(x[:600] + 0.5 * torch.randn(600, 1, 16, 16), y[:600])
    assert noise["accuracy"] < 0.3 and real["fid"] < blurred["fid"] < noise["fid"]


def test_feature_extractor_interface():
    extractor = DigitsFeatures()
    assert isinstance(extractor, FeatureExtractor)
    x, _ = load_digits_tensors()
    feats = compute_features(extractor, [x[:100], x[100:150]], progress=False)
    assert feats["features"].shape == (150, 64) and feats["logits"].shape == (150, 10)


def test_bad_inputs(evaluator, tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        evaluator.evaluate(torch.zeros(4, 1, 8, 8), torch.zeros(4))
    with pytest.raises(ValueError, match="label"):
        evaluator.evaluate(torch.zeros(4, 1, 16, 16), torch.zeros(3))
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        DigitsEvaluator(weights=str(tmp_path / "none.pt"))


def test_training_is_deterministic():
    a, ma = train_digits_classifier(epochs=1, seed=3, log=None)
    b, mb = train_digits_classifier(epochs=1, seed=3, log=None)
    assert ma == mb
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_mnist_classifier_shipped_and_accurate_on_the_held_out_split():
    from ssm_tread.data import load_mnist_tensors
    from ssm_tread.eval.digits import MNIST_WEIGHTS

    assert os.path.isfile(MNIST_WEIGHTS) and os.path.getsize(MNIST_WEIGHTS) < 2 * 1024 * 1024
    model, metrics = load_digits_classifier(dataset="mnist")
    x, y = load_mnist_tensors("test")
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    # tools/train_digits_classifier.py --data mnist measured 0.975 on these 1,000 images
    assert len(y) == 1000 and acc > 0.96
    assert acc == pytest.approx(metrics["heldout_accuracy"]) and metrics["heldout_images"] == 1000


def test_mnist_evaluator_scores_held_out_digits_well_and_noise_badly():
    from ssm_tread.data import load_mnist_tensors

    evaluator = DigitsEvaluator(dataset="mnist")
    x, y = load_mnist_tensors("test")
    held_out = evaluator.evaluate(x[:500], y[:500])
    torch.manual_seed(0)
    noise = evaluator.evaluate(torch.rand(500, 1, 32, 32) * 2 - 1, y[:500])
    assert held_out["accuracy"] > 0.95 and noise["accuracy"] < 0.3 and 3 * held_out["fid"] < noise["fid"]
    with pytest.raises(ValueError, match=r"mnist images must be \[N, 1, 32, 32\]"):
        evaluator.evaluate(torch.zeros(4, 1, 16, 16), torch.zeros(4))
    with pytest.raises(ValueError, match="no classifier for data set 'cifar'"):
        DigitsEvaluator(dataset="cifar")


def test_mnist_reference_statistics_shipped_with_the_weights_are_theirs():
    from ssm_tread.data import load_mnist_tensors
    from ssm_tread.eval.metrics import feature_statistics

    model, _ = load_digits_classifier(dataset="mnist")
    with torch.no_grad():
        feats = torch.cat([model.features(x) for x in load_mnist_tensors("train")[0].split(1000)]).double().numpy()
    mu, sigma = feature_statistics(feats)
    stored_mu, stored_sigma = DigitsFeatures(dataset="mnist").reference
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    assert np.allclose(stored_mu, mu, rtol=1e-4, atol=1e-4) and np.allclose(stored_sigma, sigma, rtol=1e-4, atol=1e-3)
    assert DigitsFeatures().reference is None  # the digits weights predate stored statistics: computed at start


def test_saved_statistics_are_those_the_evaluator_would_compute(tmp_path):
    model, metrics = train_digits_classifier(epochs=1, seed=3, log=None)
    path = str(tmp_path / "clf.pt")
    save_digits_classifier(model, metrics, path)
    stored = DigitsEvaluator(weights=path).reference
    computed = reference_statistics(DigitsFeatures(weights=path), "digits")
    assert all(np.array_equal(a, b) for a, b in zip(stored, computed))
