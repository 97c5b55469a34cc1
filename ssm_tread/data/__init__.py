"""Datasets: the handwritten digits (1x16x16, bundled), a 5,000-image MNIST subset (1x32x32, bundled) and
pre-extracted VAE latent shards (4x32x32 for ImageNet-256)."""
from .digits import DigitsDataset, load_digits_tensors
from .mnist import MNISTDataset, load_mnist_tensors
from .latents import SCALE_FACTOR, LatentShardDataset, latent_statistics, verify_shards
from .transforms import adm_center_crop


def build_dataset(name, **kwargs):
    """`build_dataset("digits", image_size=16)`, `build_dataset("mnist", split="train")` or
    `build_dataset("latents", root=..., flip=True, sample=True)`.

    Each dataset yields (x float [C, H, W], y long) and has attributes channels, image_size, num_classes.
    """
    if name == "digits":
        return DigitsDataset(**kwargs)
    if name == "mnist":
        return MNISTDataset(**kwargs)
    if name == "latents":
        return LatentShardDataset(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose 'digits', 'mnist' or 'latents'")


__all__ = ["build_dataset", "DigitsDataset", "LatentShardDataset", "MNISTDataset", "SCALE_FACTOR",
           "adm_center_crop", "latent_statistics", "load_digits_tensors", "load_mnist_tensors", "verify_shards"]
