"""Frechet distance, Inception Score and precision/recall against closed forms and brute-force references."""
import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist

from ssm_tread.eval import (
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    inception_score,
    manifold_radii,
    precision_recall,
)


def random_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_sqrtm_formula():
    rng = np.random.default_rng(1)
    s1, s2 = random_spd(rng, 20), random_spd(rng, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = feature_statistics(rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_nearly_singular_is_finite():
    rng = np.random.default_rng(3)
    few = rng.standard_normal((10, 64))  # rank-9 covariance in 64 dimensions
    other = rng.standard_normal((12, 64)) + 0.5
    d = frechet_distance(*feature_statistics(few), *feature_statistics(other))
    assert np.isfinite(d) and d > 0
    zero = np.zeros((64, 64))
    assert frechet_distance(np.zeros(64), zero, np.ones(64), zero) == pytest.approx(64)
    assert np.isfinite(frechet_distance(np.zeros(64), zero + 1e-30 * np.eye(64), np.zeros(64), np.eye(64)))


@pytest.mark.parametrize("n", [2, 7, 40, 41, 100])  # fewer samples than the 40 dimensions, and more
def test_frechet_of_features_matches_sqrtm_of_their_statistics(n):
    rng = np.random.default_rng(n)
    features = rng.standard_normal((n, 40)) @ rng.standard_normal((40, 40)) * 0.3 + 1.0
    mu, sigma = rng.standard_normal(40), random_spd(rng, 40)
    s1 = np.cov(features, rowvar=False)
    diff = features.mean(0) - mu
    expected = diff @ diff + np.trace(s1) + np.trace(sigma) - 2 * np.trace(linalg.sqrtm(s1 @ sigma)).real
    assert frechet_distance_of(features, mu, sigma) == pytest.approx(expected, rel=1e-7)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance_of(features, mu[:-1], sigma[:-1, :-1])


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(4).standard_normal((50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert np.allclose(mu, x.mean(0)) and np.allclose(sigma, np.cov(x.T), atol=1e-6)


def test_inception_score_uniform_is_one():
    assert inception_score(np.zeros((1000, 1008))) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_inception_score_one_hot_is_k(k):
    labels = np.arange(1000) % k  # every split of 100 uses the k classes equally
    logits = np.zeros((1000, 1008))
    logits[np.arange(1000), labels] = 100.0
    assert inception_score(logits, splits=10) == pytest.approx(k, rel=1e-6)


def naive_inception_score(logits, splits):
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        kl = (part * (np.log(part) - np.log(part.mean(0)))).sum(1).mean()
        scores.append(np.exp(kl))
    return np.mean(scores)


@pytest.mark.parametrize("n", [300, 301, 302])  # 3 splits of equal and of unequal sizes
def test_inception_score_matches_naive_formula(n):
    logits = np.random.default_rng(5).standard_normal((n, 7)) * 3
    assert inception_score(logits, splits=3) == pytest.approx(naive_inception_score(logits, 3), rel=1e-10)


def test_inception_score_of_shifted_logits():
    """Softmax ignores a per-row shift: logits of 1e4 (whose exp overflows float64) give the score of the
    unshifted ones."""
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((300, 7)) * 3
    shifted = logits + rng.uniform(1e4, 2e4, (300, 1))
    assert inception_score(shifted, splits=3) == pytest.approx(naive_inception_score(logits, 3), rel=1e-9)


def test_manifold_radii_brute_force():
    x = np.random.default_rng(6).standard_normal((37, 5)).astype(np.float32)
    expected = np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, 3]
    assert np.allclose(manifold_radii(torch.from_numpy(x), k=3, batch_size=8).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_precision_recall_brute_force():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((60, 4)), rng.standard_normal((45, 4)) * 0.5 + 1.5
    r_real = np.sort(cdist(real, real, "sqeuclidean"), axis=1)[:, 3]
    r_fake = np.sort(cdist(fake, fake, "sqeuclidean"), axis=1)[:, 3]
    d = cdist(real, fake, "sqeuclidean")  # [60, 45]
    precision = (d <= r_real[:, None]).any(0).mean()
    recall = (d <= r_fake[None, :]).any(1).mean()
    p, r = precision_recall(real, fake, k=3, batch_size=16)
    assert (p, r) == pytest.approx((precision, recall))
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(8).standard_normal((50, 16))
    assert precision_recall(x, x.copy(), batch_size=7) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_too_few_points():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="10 splits"):
        inception_score(np.zeros((5, 4)))
