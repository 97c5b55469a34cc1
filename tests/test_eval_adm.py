"""The ADM suite driver: streaming .npz reading, reference statistics, results, and clear input errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssm_tread.eval import FeatureExtractor, NpzImages, evaluate_npz, feature_statistics, frechet_distance, summary_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PixelFeatures(FeatureExtractor):
    """A cheap stand-in for Inception: fixed slices of the flattened pixels."""

    def features(self, images):
        x = torch.as_tensor(np.asarray(images)).flatten(1).float() / 255
        return {"pool": x[:, :12], "spatial": x[:, 12:20], "logits": 10 * x[:, :10]}


def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streaming_round_trip(tmp_path, save):
    arr = images(23)
    save(tmp_path / "s.npz", arr, labels=np.arange(23))
    reader = NpzImages(str(tmp_path / "s.npz"))
    assert len(reader) == 23 and reader.num_batches(5) == 5 and sorted(reader.keys) == ["arr_0", "labels"]
    assert np.array_equal(np.concatenate(list(reader.batches(5))), arr)


def test_fid_of_a_set_with_itself(tmp_path):
    np.savez(tmp_path / "a.npz", images(60))
    r = evaluate_npz(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), extractor=PixelFeatures(), batch_size=16,
                     progress=False)
    assert abs(r["fid"]) < 1e-6 and abs(r["sfid"]) < 1e-6
    assert (r["precision"], r["recall"]) == (1.0, 1.0)
    assert r["num_samples"] == r["num_reference_images"] == 60 and np.isfinite(r["inception_score"])
    assert r["reference_statistics"] == "computed from arr_0"
    assert summary_line(r).startswith("FID 0.00 | sFID 0.00 | IS ")


def test_stored_reference_statistics_are_used(tmp_path):
    samples, other = images(40), images(50, seed=1)
    feats = PixelFeatures().features(other)
    mu, sigma = feature_statistics(feats["pool"].numpy())
    mu_s, sigma_s = feature_statistics(feats["spatial"].numpy())
    np.savez(tmp_path / "s.npz", samples)
    np.savez(tmp_path / "ref.npz", images(30, seed=2), mu=mu + 1, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    r = evaluate_npz(str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), extractor=PixelFeatures(), progress=False)
    own = PixelFeatures().features(samples)
    assert r["fid"] == pytest.approx(frechet_distance(*feature_statistics(own["pool"].numpy()), mu + 1, sigma))
    assert r["sfid"] == pytest.approx(frechet_distance(*feature_statistics(own["spatial"].numpy()), mu_s, sigma_s))
    assert r["reference_statistics"] == "stored mu/sigma" and r["num_reference_images"] == 30
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    r = evaluate_npz(str(tmp_path / "s.npz"), str(tmp_path / "stats_only.npz"), extractor=PixelFeatures(),
                     progress=False)
    assert r["precision"] is None and r["sfid"] is None and np.isfinite(r["fid"])
    assert "n/a" in summary_line(r)


def test_bad_inputs(tmp_path):
    good = str(tmp_path / "good.npz")
    np.savez(good, images(10))
    run = lambda s, ref=good: evaluate_npz(s, ref, extractor=PixelFeatures(), progress=False)  # noqa: E731
    np.savez(tmp_path / "key.npz", images=images(10))
    with pytest.raises(KeyError, match="'arr_0'.*images"):
        run(str(tmp_path / "key.npz"))
    np.savez(tmp_path / "float.npz", images(10).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        run(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "nchw.npz", images(10).transpose(0, 3, 1, 2).copy())
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        run(str(tmp_path / "nchw.npz"))
    np.savez(tmp_path / "small.npz", images(10, size=4))
    with pytest.raises(ValueError, match="4x4.*8x8"):
        run(str(tmp_path / "small.npz"))
    with pytest.raises(FileNotFoundError, match="no such"):
        run(str(tmp_path / "missing.npz"))
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz"):
        run(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "empty_ref.npz", foo=np.zeros(3))
    with pytest.raises(KeyError, match="neither"):
        run(good, str(tmp_path / "empty_ref.npz"))


def test_cli_missing_inception(tmp_path):
    np.savez(tmp_path / "s.npz", images(10))
    missing = str(tmp_path / "nope.pth")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_fid.py"), str(tmp_path / "s.npz"),
                          str(tmp_path / "s.npz"), "--inception", missing], capture_output=True, text=True)
    assert res.returncode != 0
    assert "pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth" in res.stderr
    assert missing in res.stderr
