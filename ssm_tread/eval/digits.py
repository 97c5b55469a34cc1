"""Evaluation for the small pixel data sets, the 16x16 digits and the 32x32 MNIST subset: a small CNN
classifier per data set gives features (digits FID, MNIST FID) and class accuracy.

The classifiers are trained by tools/train_digits_classifier.py (deterministic, CPU): the digits' on a fixed
random split of the sklearn digits, MNIST's on its 4,000 training images (its 1,000 test images held out);
their weights ship as ssm_tread/assets/digits_classifier.pt and ssm_tread/assets/mnist_classifier.pt.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import load_digits_tensors
from ..data.mnist import MNIST_SIZE, load_mnist_tensors
from .features import FeatureExtractor
from .metrics import feature_statistics, frechet_distance

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_classifier.pt")
MNIST_WEIGHTS = os.path.join(os.path.dirname(DEFAULT_WEIGHTS), "mnist_classifier.pt")
# data set -> (default classifier weights, image size)
PIXEL_DATASETS = {"digits": (DEFAULT_WEIGHTS, 16), "mnist": (MNIST_WEIGHTS, MNIST_SIZE)}


def _check_dataset(dataset):
    if dataset not in PIXEL_DATASETS:
        raise ValueError(f"no classifier for data set {dataset!r}; choose {' or '.join(map(repr, PIXEL_DATASETS))}")


class DigitsClassifier(nn.Module):
    """x [B, 1, S, S] in [-1, 1] -> logits [B, 10]; features(x) -> penultimate activations [B, feature_dim].
    S = image_size: 16 (digits) or 32 (MNIST)."""

    def __init__(self, width=32, feature_dim=64, image_size=16):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "image_size": image_size}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # [B, w, S/2, S/2]
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # [B, 2w, S/4, S/4]
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU())  # [B, feature_dim]
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


def classifier_split(dataset="digits", holdout=0.2, seed=0):
    """A classifier's data -> (images [N, 1, S, S], labels [N], train indices, held-out indices): the digits
    split at random (``holdout`` of them held out, :func:`holdout_split`); MNIST's own split, the 1,000 test
    images held out (``holdout`` and ``seed`` play no part)."""
    _check_dataset(dataset)
    if dataset == "digits":
        x, y = load_digits_tensors(16)
        return (x, y, *holdout_split(len(y), holdout, seed))
    (x_train, y_train), (x_test, y_test) = load_mnist_tensors("train"), load_mnist_tensors("test")
    n = len(y_train)
    return (torch.cat([x_train, x_test]), torch.cat([y_train, y_test]), torch.arange(n),
            torch.arange(n, n + len(y_test)))


def train_digits_classifier(dataset="digits", epochs=40, batch_size=64, lr=2e-3, holdout=0.2, seed=0, log=print):
    """Train on the data set's non-held-out images (CPU) -> (model, {"heldout_accuracy", "train_accuracy", ...})."""
    x, y, train_idx, test_idx = classifier_split(dataset, holdout, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier(image_size=PIXEL_DATASETS[dataset][1])
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
        if log and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            log(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {accuracy(model, x[test_idx], y[test_idx]):.4f}")
    metrics = {"heldout_accuracy": accuracy(model, x[test_idx], y[test_idx]),
               "train_accuracy": accuracy(model, x[train_idx], y[train_idx]),
               "dataset": dataset, "heldout_images": len(test_idx), "seed": seed, "epochs": epochs}
    if dataset == "digits":
        metrics["heldout"] = holdout
    return model, metrics


def save_digits_classifier(model, metrics, path=DEFAULT_WEIGHTS):
    """The weights, then with them the statistics of their features of :func:`reference_images` (so that an
    evaluator need not compute them each time it starts: seconds for MNIST's 4,000 images on one CPU thread)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ckpt = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "config": model.config,
            "metrics": metrics}
    torch.save(ckpt, path)
    dataset = metrics.get("dataset", "digits")
    mu, sigma = reference_statistics(DigitsFeatures(path, dataset=dataset), dataset)
    torch.save({**ckpt, "reference": {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}}, path)


def _load_checkpoint(path, dataset):
    _check_dataset(dataset)
    path = path or PIXEL_DATASETS[dataset][0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset} classifier weights not found at {path!r}; train them with "
                                f"`python tools/train_digits_classifier.py --data {dataset} --out {path}`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def load_digits_classifier(path=None, dataset="digits"):
    """-> (model in eval mode, the checkpoint's metrics dict); ``path`` None: the data set's bundled weights."""
    model, ckpt = _load_checkpoint(path, dataset)
    return model, ckpt["metrics"]


class DigitsFeatures(FeatureExtractor):
    """images float [B, 1, S, S] in [-1, 1] -> {"features": [B, 64], "logits": [B, 10]}; S: 16 (digits), 32 (MNIST)."""

    def __init__(self, weights=None, device="cpu", dataset="digits"):
        self.device = torch.device(device)
        model, ckpt = _load_checkpoint(weights, dataset)
        self.model = model.to(self.device)
        self.dataset, self.image_size = dataset, self.model.config["image_size"]
        stored = ckpt.get("reference")  # saved with the weights (None in checkpoints from before that)
        self.reference = None if stored is None else (stored["mu"].numpy(), stored["sigma"].numpy())

    @torch.no_grad()
    def features(self, images):
        x = torch.as_tensor(images).float().to(self.device).clamp(-1, 1)
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"{self.dataset} images must be [N, 1, {s}, {s}] in [-1, 1], got {tuple(x.shape)}")
        h = self.model.features(x)
        return {"features": h.cpu(), "logits": self.model.head(h).cpu()}


def reference_images(dataset="digits"):
    """The images samples are compared with: all 1,797 digits [1797, 1, 16, 16]; MNIST's 4,000 training
    images [4000, 1, 32, 32] (those its generative models train on)."""
    _check_dataset(dataset)
    return load_digits_tensors(16)[0] if dataset == "digits" else load_mnist_tensors("train")[0]


def reference_statistics(extractor, dataset="digits", batch_size=512):
    """(mu [64], sigma [64, 64]) float64 of a :class:`DigitsFeatures`' features of :func:`reference_images`."""
    images = reference_images(dataset)
    feats = [extractor.features(images[i:i + batch_size])["features"] for i in range(0, len(images), batch_size)]
    return feature_statistics(torch.cat(feats).numpy())


class DigitsEvaluator:
    """evaluate(images [N, 1, S, S] in [-1, 1] (clamped), labels [N]) -> {"fid", "accuracy"}; ``dataset``
    "digits" (S = 16) or "mnist" (S = 32).

    fid: Frechet distance between the data set's classifier's penultimate features of the images and of
    :func:`reference_images` (their statistics as stored with the weights, if they are); accuracy: share of
    images the classifier assigns to their label.
    """

    def __init__(self, weights=None, device="cpu", batch_size=512, dataset="digits"):
        self.extractor = DigitsFeatures(weights, device, dataset)
        self.batch_size = batch_size
        self.reference = self.extractor.reference or reference_statistics(self.extractor, dataset, batch_size)

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
