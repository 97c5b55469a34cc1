"""Sampling: grids, restartable .npz chunks, the merged ADM-format file, and the VAE error."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssm_tread import sampling
from ssm_tread.train.config import load_config
from ssm_tread.train.trainer import train

TINY = ["model.name=DiT", "model.kwargs={'hidden_size': 32, 'depth': 2, 'num_heads': 2, 'patch_size': 4}",
        "routing.routes=[]", "train.batch_size=8", "train.steps=1", "log.tensorboard=false", "log.progress=false",
        "eval.num_samples=0", "sample.steps=2", "sample.sampler=euler", "sample.grid_classes=[0]",
        "sample.grid_per_class=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(load_config("configs/quickstart.py", [*TINY, f"train.run_dir={path}"]))
    return path


def test_grid_for_chosen_classes(run_dir, tmp_path):
    from PIL import Image
    out = sampling.sample_grid_file(run_dir, tmp_path / "grid.png", [3, 1, 4], per_class=5)
    width, height = Image.open(out).size
    assert width > height > 0


def test_grid_of_a_number_of_images(run_dir, tmp_path):
    from PIL import Image
    out = sampling.sample_grid_file(run_dir, tmp_path / "grid.png", None, per_class=4, num_images=8,
                                    label_mode="balanced")
    assert Image.open(out).size == (4 * 66 + 2, 2 * 66 + 2)  # 16 px digits shown at 64 px, 2 px gaps
    with pytest.raises(ValueError, match="either classes or a number of images"):
        sampling.sample_grid_file(run_dir, tmp_path / "none.png", None, per_class=4)


def test_npz_chunks_resume_and_merge(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    model, diffusion, cfg = sampling.load_for_sampling(run_dir, torch.device("cpu"))
    labels = sampling.make_labels(10, 10, "balanced", seed=0)
    folder = sampling.sample_chunks(model, diffusion, out, labels, 4, cfg["sample"], seed=0)
    assert sorted(p.name for p in folder.glob("chunk-*.npz")) == [f"chunk-00000{i}.npz" for i in range(3)]
    first = np.load(folder / "chunk-000001.npz")["images"]
    (folder / "chunk-000001.npz").unlink()

    calls = []
    real_generate = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: calls.append(len(a[2])) or real_generate(*a, **k))
    sampling.sample_chunks(model, diffusion, out, labels, 4, cfg["sample"], seed=0)
    assert calls == [4]  # only the missing chunk is sampled again, to the same images
    np.testing.assert_array_equal(np.load(folder / "chunk-000001.npz")["images"], first)

    sampling.merge_chunks(folder, out)
    data = np.load(out)
    assert data["arr_0"].shape == (10, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], labels.numpy())
    np.testing.assert_array_equal(data["arr_0"][4:8], first)
    assert (data["arr_0"][..., 0] == data["arr_0"][..., 2]).all()  # grayscale repeated to three channels


def test_chunks_of_other_settings_are_refused(run_dir, tmp_path):
    model, diffusion, cfg = sampling.load_for_sampling(run_dir, torch.device("cpu"))
    labels = sampling.make_labels(4, 10, "random", seed=0)
    sampling.sample_chunks(model, diffusion, tmp_path / "s.npz", labels, 4, cfg["sample"], seed=0)
    with pytest.raises(ValueError, match=r"another plan .*sample.cfg_scale 1.5 -> 2.0"):
        sampling.sample_chunks(model, diffusion, tmp_path / "s.npz", labels, 4, {**cfg["sample"], "cfg_scale": 2.0}, seed=0)


def test_labels_random_and_balanced():
    balanced = sampling.make_labels(1000, 10, "balanced", seed=1)
    assert torch.bincount(balanced).tolist() == [100] * 10 and balanced[:10].tolist() != list(range(10))
    assert sampling.make_labels(50, 10, "random", seed=1).max() < 10


def test_missing_vae_says_where_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download stabilityai/sd-vae-ft-ema"):
        sampling.load_vae(tmp_path / "vae", torch.device("cpu"))


def test_cli_writes_an_npz(run_dir, tmp_path):
    out = tmp_path / "cli.npz"
    done = subprocess.run([sys.executable, "tools/sample.py", str(run_dir), "--num-images", "5", "--batch-size", "2",
                           "--steps", "1", "--out", str(out)], capture_output=True, text=True, check=False, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.load(out)["arr_0"].shape == (5, 16, 16, 3) and not (tmp_path / "cli.npz.chunks").exists()


def test_the_default_batch_is_cut_to_leave_no_rank_idle(run_dir, tmp_path):
    # the config samples 100 a batch; 3 images on one process: one chunk of 3 (ceil(3 / 1)), as recorded
    out = sampling.sample_npz_file(run_dir, tmp_path / "few.npz", 3, sample_overrides={"steps": 1}, progress=False)
    assert sampling.recorded_plan(out)["batch_size"] == 3
    out = sampling.sample_npz_file(run_dir, tmp_path / "given.npz", 3, sample_overrides={"steps": 1, "batch_size": 2},
                                   progress=False)
    assert sampling.recorded_plan(out)["batch_size"] == 2  # a batch asked for is kept


def test_sample_use_ema_false_samples_the_raw_weights(tmp_path):
    from ssm_tread.checkpoint import load_checkpoint

    train(load_config("configs/quickstart.py", [*TINY, f"train.run_dir={tmp_path}", "sample.use_ema=false"]))
    state = load_checkpoint(tmp_path)
    model, _, _, source = sampling.load_with_source(tmp_path, torch.device("cpu"))
    assert source["weights"] == "raw"
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())
    assert not all(torch.equal(weights[k], v) for k, v in state["ema"].items())  # one step apart
    ema, *_ = sampling.load_for_sampling(tmp_path, torch.device("cpu"), use_ema=True)  # an explicit choice wins
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in state["ema"].items())
