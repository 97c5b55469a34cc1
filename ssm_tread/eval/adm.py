"""The ADM evaluation suite (guided-diffusion evaluations/evaluator.py) on .npz sample and reference batches.

Samples: an .npz whose arr_0 is uint8 [N, H, W, 3]. Reference: ADM's reference batch of the resolution
(:data:`REFERENCE_BATCHES`: VIRTUAL_imagenet256_labeled.npz, VIRTUAL_imagenet512.npz), arr_0 images and,
when present, the stored statistics mu/sigma (pool_3) and mu_s/sigma_s (spatial), which are used for FID
and sFID in place of statistics of its images, as the ADM evaluator does. Images of any size are resized
to Inception's 299 x 299 inside the feature extractor, as in ADM's graph; samples and reference images
must have the same size.

Before any feature is computed the counts are checked (10 samples for the Inception Score's 10 splits,
more than 3 reference images for precision/recall with k=3); after, features without spread (trace of
their covariance essentially zero, as from untrained Inception weights) are refused instead of reported.
"""
import os
import zipfile
from contextlib import contextmanager

import numpy as np

from .features import compute_features
from .inception import DEFAULT_INCEPTION_PATH, InceptionFeatures
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

IS_SPLITS, PR_K = 10, 3  # the ADM evaluator's
_REF_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
# ADM's ImageNet reference batches (openai/guided-diffusion, evaluations/README.md): image size -> (file, URL)
REFERENCE_BATCHES = {
    256: ("VIRTUAL_imagenet256_labeled.npz", f"{_REF_BATCHES}/256/VIRTUAL_imagenet256_labeled.npz"),
    512: ("VIRTUAL_imagenet512.npz", f"{_REF_BATCHES}/512/VIRTUAL_imagenet512.npz"),
}


def reference_batch(path=None, image_size=256):
    """(file name, download URL) of the ADM reference batch that ``path`` names (by its file name), else of
    ``image_size``."""
    by_name = {name: (name, url) for name, url in REFERENCE_BATCHES.values()}
    return by_name.get(os.path.basename(str(path or "")), REFERENCE_BATCHES[image_size])
MIN_SPREAD = 1e-6  # least trace of the pool_3 covariance: features varying less carry nothing about the images


def check_spread(features, what, inception_path):
    """Raise unless ``features`` [N, D] vary: the trace of their covariance must exceed ``MIN_SPREAD`` times
    max(1, |mean|^2), else the FID would measure nothing."""
    mu, sigma = feature_statistics(features)
    spread = float(np.trace(sigma))
    if spread <= MIN_SPREAD * max(1.0, float(mu @ mu)):
        raise ValueError(f"the Inception features of the {what} are degenerate (trace of their covariance "
                         f"{spread:.1e}): the weights in {inception_path} are not the trained FID Inception "
                         f"(pt_inception-2015-12-05-6726825d.pth), or every image is the same; refusing to report "
                         f"an FID")


class NpzImages:
    """Streams one uint8 [N, H, W, 3] array of an .npz in batches, without loading it whole."""

    def __init__(self, path, key="arr_0"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such .npz file: {path!r}")
        self.path, self.key = path, key
        try:
            with zipfile.ZipFile(path) as z:
                self.keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile:
            raise ValueError(f"{path!r} is not an .npz file (save samples with np.savez(path, images))") from None
        self.present = key in self.keys
        if not self.present:
            return
        with self._open() as f:
            self.shape, self.dtype = self._header(f)
        if self.dtype != np.uint8:
            raise ValueError(f"{path}: '{key}' is {self.dtype}; images must be uint8 in 0..255 "
                             f"(convert with (x * 127.5 + 128).clip(0, 255).astype(np.uint8) from [-1, 1])")
        if len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(f"{path}: '{key}' has shape {self.shape}; expected NHWC RGB images [N, H, W, 3]")

    @contextmanager
    def _open(self):
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            yield f

    def _header(self, f):
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"{self.path}: unsupported .npy version {version} for '{self.key}'")
        shape, fortran, dtype = read[version](f)
        if fortran:
            raise ValueError(f"{self.path}: '{self.key}' is stored in Fortran order; save a C-contiguous array")
        return shape, dtype

    def require(self):
        if not self.present:
            raise KeyError(f"{self.path} has no '{self.key}' array (it has {self.keys}); samples must be saved "
                           f"as np.savez(path, images) so that the images are under 'arr_0'")
        return self

    def __len__(self):
        return self.shape[0]

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def batches(self, batch_size):
        self.require()
        row = int(np.prod(self.shape[1:]))
        with self._open() as f:
            self._header(f)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{self.path}: '{self.key}' is truncated at image {start}")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, *self.shape[1:])


def reference_statistics(path, keys):
    """(mu, sigma) stored in a reference .npz under keys, or None."""
    with np.load(path) as ref:
        if all(k in ref.files for k in keys):
            return tuple(ref[k] for k in keys)
    return None


def evaluate_npz(samples_path, reference_path, inception_path=DEFAULT_INCEPTION_PATH, batch_size=100,
                 device=None, extractor=None, progress=True):
    """The ADM suite: Inception Score (10 splits), FID, sFID, precision and recall (k=3). Returns a dict."""
    samples = NpzImages(samples_path)
    if {"mu", "sigma"} <= set(samples.keys):
        raise ValueError(f"{samples_path} stores mu/sigma: it is a reference batch, given where the samples go. "
                         f"The order is SAMPLES REFERENCE (ADM's evaluator.py takes REFERENCE SAMPLES): swap the two")
    samples.require()
    if len(samples) < IS_SPLITS:
        raise ValueError(f"{samples_path} holds {len(samples)} samples: the Inception Score needs at least "
                         f"{IS_SPLITS} (one per split); ADM evaluates 50,000")
    reference = NpzImages(reference_path)
    stored = reference_statistics(reference_path, ["mu", "sigma"])
    stored_s = reference_statistics(reference_path, ["mu_s", "sigma_s"])
    if not reference.present and stored is None:
        raise KeyError(f"{reference_path} has neither images 'arr_0' nor statistics 'mu'/'sigma' (it has "
                       f"{reference.keys}); use the ADM reference batch of the resolution: "
                       f"{', '.join(name for name, _ in REFERENCE_BATCHES.values())}")
    if reference.present and samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples are {samples.shape[1]}x{samples.shape[2]} images but the reference images are "
                         f"{reference.shape[1]}x{reference.shape[2]}; evaluate samples at the reference resolution")
    if reference.present and len(reference) <= PR_K:
        raise ValueError(f"{reference_path} holds {len(reference)} reference images: precision and recall "
                         f"(k={PR_K}) need more than {PR_K}")
    extractor = extractor or InceptionFeatures(inception_path, device)
    feats = compute_features(extractor, samples.batches(batch_size), samples.num_batches(batch_size),
                             progress, desc="sample features")
    check_spread(feats["pool"], f"{len(samples)} samples", inception_path)
    ref_feats = None
    if reference.present:
        ref_feats = compute_features(extractor, reference.batches(batch_size), reference.num_batches(batch_size),
                                     progress, desc="reference features")
        check_spread(ref_feats["pool"], f"{len(reference)} reference images", inception_path)
    ref_stats = stored or feature_statistics(ref_feats["pool"])
    ref_stats_s = stored_s or (feature_statistics(ref_feats["spatial"]) if ref_feats else None)
    results = {
        "inception_score": inception_score(feats["logits"], splits=IS_SPLITS),
        "fid": frechet_distance(*feature_statistics(feats["pool"]), *ref_stats),
        "sfid": frechet_distance(*feature_statistics(feats["spatial"]), *ref_stats_s) if ref_stats_s else None,
        "precision": None, "recall": None,
        "num_samples": len(samples), "num_reference_images": len(reference) if reference.present else 0,
        "reference_statistics": "stored mu/sigma" if stored else "computed from arr_0",
        "samples": os.path.abspath(samples_path), "reference": os.path.abspath(reference_path),
    }
    if ref_feats is not None:
        results["precision"], results["recall"] = precision_recall(ref_feats["pool"], feats["pool"], k=PR_K,
                                                                   device=getattr(extractor, "device", None))
    return results


def summary_line(results):
    """One line: 'FID 2.27 | sFID 4.60 | IS 278.24 | precision 0.8280 | recall 0.5790 | 50000 samples'."""
    def fmt(value, spec):
        if value is None:
            return "n/a"
        text = format(value, spec)
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # rounding noise: "-0.00" -> "0.00"
    return (f"FID {fmt(results['fid'], '.2f')} | sFID {fmt(results['sfid'], '.2f')} | "
            f"IS {fmt(results['inception_score'], '.2f')} | precision {fmt(results['precision'], '.4f')} | "
            f"recall {fmt(results['recall'], '.4f')} | {results['num_samples']} samples vs "
            f"{os.path.basename(results['reference'])}")
