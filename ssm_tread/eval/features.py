"""The pluggable feature-extractor interface and a batched driver."""
import numpy as np
import torch

from ssm_tread.progress import progress_bar


class FeatureExtractor:
    """Maps a batch of images to named feature arrays: features(images) -> {name: tensor [B, D]}.

    InceptionFeatures (ImageNet, uint8 NHWC images) and DigitsFeatures (1x16x16 images in [-1, 1]) implement it.
    """

    def features(self, images):
        raise NotImplementedError


def compute_features(extractor, batches, total=None, progress=True, desc="features"):
    """Run the extractor over an iterable of image batches -> {name: float32 numpy [N, D]}.

    total: number of batches (for the progress bar) when `batches` has no len().
    """
    out = {}
    for batch in progress_bar(batches, enabled=progress, total=total, desc=desc, unit="batch"):
        for name, value in extractor.features(batch).items():
            out.setdefault(name, []).append(torch.as_tensor(value).float().cpu().numpy())
    if not out:
        raise ValueError("no images to compute features of")
    return {name: np.concatenate(parts) for name, parts in out.items()}
