"""The UCI handwritten digits (as scikit-learn ships them) as a tiny image dataset: 1,797 images, 1x16x16 in
[-1, 1], 10 classes. The 8x8 originals ship with the package (assets/digits.npz, 45 KB), so the digits need
no scikit-learn."""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits.npz")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 originals: (images uint8 [1797, 8, 8] with values 0..16, labels uint8 [1797]), in
    ``sklearn.datasets.load_digits()`` order."""
    with np.load(DIGITS_PATH) as digits:
        return digits["images"], digits["labels"]


def load_digits_tensors(image_size=16):
    """All digits as (images float [1797, 1, S, S] in [-1, 1], labels long [1797]).

    The 8x8 originals (values 0..16) are upsampled bilinearly (align_corners=False) to image_size.
    """
    images, labels = load_digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.tensor(labels, dtype=torch.long)
    return x, y


class DigitsDataset(Dataset):
    """(x float [1, S, S] in [-1, 1], y long in 0..9); S = image_size (16 by default)."""
    channels = 1
    num_classes = 10

    def __init__(self, image_size=16):
        self.image_size = image_size
        self.images, self.labels = load_digits_tensors(image_size)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]
