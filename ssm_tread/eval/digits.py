"""Evaluation for the 16x16 digits task: a small CNN classifier gives features (digits FID) and accuracy.

The classifier is trained by tools/train_digits_classifier.py (deterministic, CPU) on a fixed split of the
sklearn digits; its weights ship as ssm_tread/assets/digits_classifier.pt.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import load_digits_tensors
from .features import FeatureExtractor
from .metrics import feature_statistics, frechet_distance

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_classifier.pt")


class DigitsClassifier(nn.Module):
    """x [B, 1, 16, 16] in [-1, 1] -> logits [B, 10]; features(x) -> penultimate activations [B, feature_dim]."""

    def __init__(self, width=32, feature_dim=64):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # [B, w, 8, 8]
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # [B, 2w, 4, 4]
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU())             # [B, feature_dim]
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def holdout_split(n, holdout=0.2, seed=0):
    """Fixed random split of n items -> (train indices, held-out indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * holdout))
    return perm[k:], perm[:k]


def random_shift(x, generator, max_shift=1):
    """Translate each image by up to max_shift pixels (background -1 fills the border)."""
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(dim=1) == y).double().mean().item()


def train_digits_classifier(epochs=40, batch_size=64, lr=2e-3, holdout=0.2, seed=0, log=print):
    """Train on the non-held-out digits (CPU) -> (model, {"heldout_accuracy", "train_accuracy", ...})."""
    x, y = load_digits_tensors(16)
    train_idx, test_idx = holdout_split(len(y), holdout, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        if log and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {accuracy(model, x[test_idx], y[test_idx]):.4f}")
    metrics = {"heldout_accuracy": accuracy(model, x[test_idx], y[test_idx]),
               "train_accuracy": accuracy(model, x[train_idx], y[train_idx]),
               "heldout": holdout, "seed": seed, "epochs": epochs}
    return model, metrics


def save_digits_classifier(model, metrics, path=DEFAULT_WEIGHTS):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "config": model.config, "metrics": metrics}, path)


def load_digits_classifier(path=None):
    """-> (model in eval mode, the checkpoint's metrics dict)."""
    path = path or DEFAULT_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier weights not found at {path!r}; train them with "
                                f"`python tools/train_digits_classifier.py --out {path}`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["metrics"]


class DigitsFeatures(FeatureExtractor):
    """images float [B, 1, 16, 16] in [-1, 1] -> {"features": [B, 64], "logits": [B, 10]}."""

    def __init__(self, weights=None, device="cpu"):
        self.device = torch.device(device)
        self.model = load_digits_classifier(weights)[0].to(self.device)

    @torch.no_grad()
    def features(self, images):
        x = torch.as_tensor(images).float().to(self.device).clamp(-1, 1)
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"digits images must be [N, 1, 16, 16] in [-1, 1], got {tuple(x.shape)}")
        h = self.model.features(x)
        return {"features": h.cpu(), "logits": self.model.head(h).cpu()}


class DigitsEvaluator:
    """evaluate(images [N, 1, 16, 16] in [-1, 1] (clamped), labels [N]) -> {"fid", "accuracy"}.

    fid: Frechet distance between the classifier's penultimate features of the images and of all 1,797
    digits; accuracy: share of images the classifier assigns to their label.
    """

    def __init__(self, weights=None, device="cpu", batch_size=512):
        self.extractor = DigitsFeatures(weights, device)
        self.batch_size = batch_size
        self.reference = feature_statistics(self._features(load_digits_tensors(16)[0])["features"])

    def _features(self, images):
        feats = [self.extractor.features(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return {k: np.concatenate([f[k].numpy() for f in feats]) for k in feats[0]}

    def evaluate(self, images, labels):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels).long().cpu()
        if len(images) != len(labels) or len(images) < 2:
            raise ValueError(f"need >= 2 images and one label each, got {len(images)} images and {len(labels)} labels")
        feats = self._features(images)
        return {"fid": frechet_distance(*feature_statistics(feats["features"]), *self.reference),
                "accuracy": float((torch.from_numpy(feats["logits"]).argmax(1) == labels).double().mean())}
