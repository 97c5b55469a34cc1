"""Feature-space metrics of the ADM suite: Frechet distance, Inception Score, improved precision/recall."""
import math

import numpy as np
import torch


def feature_statistics(features):
    """features [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance (np.cov)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature_statistics needs features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace of the matrix square root comes from eigen-decompositions rather than scipy.linalg.sqrtm:
    with A = sigma1^(1/2) (symmetric PSD), sigma1 sigma2 has the same eigenvalues as A sigma2 A, which is
    symmetric PSD, so tr((sigma1 sigma2)^(1/2)) = sum sqrt(eig(A sigma2 A)). Round-off negatives are clipped
    to 0, so singular or nearly singular covariances give a finite value and no imaginary part arises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    for name, a in [("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)]:
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_of(features, mu, sigma):
    """``frechet_distance(*feature_statistics(features), mu, sigma)`` for features [N, D].

    With no more samples than dimensions (FID of a few thousand samples in Inception's 2048) the trace
    term comes from an N x N matrix: with X the centred features, sigma1 = X^T X / (N - 1), and sigma1 sigma
    has the nonzero eigenvalues of the symmetric PSD X sigma X^T / (N - 1).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or not 2 <= len(features) <= features.shape[1]:
        return frechet_distance(*feature_statistics(features), mu, sigma)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != features.shape[1:] or sigma.shape != mu.shape * 2:
        raise ValueError(f"mismatched statistics: features {features.shape}, mu {mu.shape}, sigma {sigma.shape}")
    if not (np.isfinite(features).all() and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("features, mu or sigma have non-finite entries")
    n = len(features)
    x = features - features.mean(axis=0)
    m = x @ ((sigma + sigma.T) / 2) @ x.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = features.mean(axis=0) - mu
    return float(diff @ diff + (x * x).sum() / (n - 1) + np.trace(sigma) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) averaged over `splits` equal chunks (ADM: 50,000 samples in 10 splits of 5,000)."""
    logp = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(dim=1)  # [N, K]
    if len(logp) < splits:
        raise ValueError(f"inception_score needs at least {splits} samples for {splits} splits, got {len(logp)}")
    scores = []
    for part in logp.tensor_split(splits):  # the chunks of np.array_split
        log_marginal = part.logsumexp(dim=0) - math.log(len(part))  # log p(y), [K]
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def pairwise_sq_distances(u, v):
    """u [n, D], v [m, D] -> squared Euclidean distances [n, m] (clamped at 0)."""
    return (u.pow(2).sum(1, keepdim=True) - 2 * u @ v.T + v.pow(2).sum(1)).clamp_min_(0)


def manifold_radii(features, k=3, batch_size=10000):
    """Squared distance of each point to its k-th nearest neighbour in the set (the point itself is the 0-th)."""
    radii = []
    for i in range(0, len(features), batch_size):
        d = torch.cat([pairwise_sq_distances(features[i:i + batch_size], features[j:j + batch_size])
                       for j in range(0, len(features), batch_size)], dim=1)  # [b, N]
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(real, fake, k=3, batch_size=10000, device=None):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as in the ADM evaluator.

    real [N, D] (reference features), fake [M, D] (sample features). Precision: share of fake points inside
    the k-NN ball of some real point; recall: share of real points inside the k-NN ball of some fake point
    (distance <= radius). Distances in float32, computed in batch_size x batch_size blocks.
    """
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(real)} and {len(fake)}")
    real_radii, fake_radii = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), batch_size):
        for j in range(0, len(fake), batch_size):
            d = pairwise_sq_distances(real[i:i + batch_size], fake[j:j + batch_size])  # [bi, bj]
            real_in[i:i + batch_size] |= (d <= fake_radii[None, j:j + batch_size]).any(dim=1)
            fake_in[j:j + batch_size] |= (d <= real_radii[i:i + batch_size, None]).any(dim=0)
    return fake_in.double().mean().item(), real_in.double().mean().item()
