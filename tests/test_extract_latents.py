"""Latent extraction end to end: ImageFolder -> ADM crop -> tiny random AutoencoderKL -> shards -> verify -> dataset."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import save_tiny_vae
from PIL import Image

from ssm_tread.data import (
    LatentShardDataset,
    adm_center_crop,
    build_dataset,
    verify_shards,
)
from ssm_tread.data.extract import extract_latents, load_vae
from ssm_tread.data.latents import SCALE_FACTOR, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"ant": [(20, 24), (40, 33), (16, 16)], "bee": [(24, 20), (50, 70), (17, 31), (64, 64)]}  # (w, h)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for cls, sizes in SIZES.items():
        os.makedirs(root / cls)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "bee" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def extract(images, out, vae_dir, **kwargs):
    return extract_latents(images, str(out), vae_dir, image_size=16, batch_size=2, shard_size=3, num_workers=0,
                           progress=False, **kwargs)


@pytest.fixture(scope="module")
def latents(images, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    stats = extract(images, out, vae_dir)
    assert stats is not None
    return str(out)


def copy_of(latents, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(latents, dst)
    return str(dst)


def test_index_and_verify(latents):
    index = read_json(os.path.join(latents, "index.json"))
    assert index["num_images"] == 7 and index["classes"] == ["ant", "bee"]
    assert index["latent_shape"] == [4, 8, 8]
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert verify_shards(latents, progress=False) == {}
    stats = read_json(os.path.join(latents, "stats.json"))
    assert len(stats["mean"]) == len(stats["std"]) == 4 and all(s > 0 for s in stats["std"])


def test_moments_match_direct_encoding(images, vae_dir, latents):
    vae = load_vae(vae_dir)
    moments = np.load(os.path.join(latents, "shard_00001.moments.npy"))  # images 3..5: bee/0, bee/1, bee/2
    assert moments.shape == (3, 2, 2, 4, 8, 8) and moments.dtype == np.float16
    with Image.open(os.path.join(images, "bee", "1.png")) as im:
        crop = np.asarray(adm_center_crop(im.convert("RGB"), 16))
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        for flip, xx in enumerate([x, x.flip(-1)]):
            post = vae.encode(xx).latent_dist
            assert np.allclose(moments[1, flip, 0], post.mean[0].numpy(), atol=2e-3, rtol=2e-3)
            assert np.allclose(moments[1, flip, 1], post.std[0].numpy(), atol=2e-3, rtol=2e-3)


def test_dataset_items(latents):
    ds = build_dataset("latents", root=latents)
    assert len(ds) == 7 and (ds.channels, ds.image_size, ds.num_classes) == (4, 8, 2)
    assert [ds[i][1].item() for i in range(7)] == [0, 0, 0, 1, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (4, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    torch.manual_seed(0)
    assert not torch.equal(ds[4][0], ds[4][0])  # a fresh posterior sample each time


def test_dataset_flips_and_scale(latents):
    moments = np.load(os.path.join(latents, "shard_00001.moments.npy")).astype(np.float32)
    ds = LatentShardDataset(latents, sample=False)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        z = ds[4][0].numpy()
        match = [f for f in (0, 1) if np.allclose(z, moments[1, f, 0] * SCALE_FACTOR, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {0, 1}
    no_flip = LatentShardDataset(latents, flip=False, sample=False)
    assert np.allclose(no_flip[4][0].numpy(), moments[1, 0, 0] * SCALE_FACTOR, atol=1e-6)


def test_dataset_sample_statistics(latents):
    moments = np.load(os.path.join(latents, "shard_00000.moments.npy")).astype(np.float64)
    ds = LatentShardDataset(latents, flip=False)
    torch.manual_seed(0)
    draws = torch.stack([ds[0][0] for _ in range(400)]).double().numpy() / SCALE_FACTOR
    mean, std = moments[0, 0, 0], moments[0, 0, 1]
    assert np.abs(draws.mean(0) - mean).max() < 5 * std.max() / np.sqrt(400) + 1e-3
    assert np.allclose(draws.std(0).mean(), std.mean(), rtol=0.1)


def test_truncated_and_missing_shards_are_named(latents, tmp_path):
    root = copy_of(latents, tmp_path)
    path = os.path.join(root, "shard_00001.moments.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os.remove(os.path.join(root, "shard_00002.labels.npy"))
    problems = verify_shards(root, progress=False)
    assert set(problems) == {"shard_00001", "shard_00002"}
    assert "truncated" in problems["shard_00001"] and "missing" in problems["shard_00002"]
    with pytest.raises(ValueError, match=r"(?s)shard_00001.*shard_00002.*--verify"):
        LatentShardDataset(root)


def test_corrupt_bytes_fail_checksum(latents, tmp_path):
    root = copy_of(latents, tmp_path)
    path = os.path.join(root, "shard_00000.moments.npy")
    data = bytearray(open(path, "rb").read())
    data[-7] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert "checksum" in verify_shards(root, progress=False)["shard_00000"]


def test_verify_cli(latents, tmp_path):
    tool = os.path.join(ROOT, "tools", "extract_latents.py")
    ok = subprocess.run([sys.executable, tool, "--verify", "--out", latents], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    root = copy_of(latents, tmp_path)
    os.remove(os.path.join(root, "shard_00002.json"))
    bad = subprocess.run([sys.executable, tool, "--verify", "--out", root], capture_output=True, text=True)
    assert bad.returncode != 0 and "shard_00002" in bad.stdout + bad.stderr


def test_resume_skips_finished_shards(images, vae_dir, latents, tmp_path):
    root = copy_of(latents, tmp_path)
    os.remove(os.path.join(root, "shard_00001.json"))  # an interrupted shard
    os.remove(os.path.join(root, "shard_00001.moments.npy"))
    before = {f: (os.stat(os.path.join(root, f)).st_mtime_ns, open(os.path.join(root, f), "rb").read())
              for f in os.listdir(root) if f.startswith(("shard_00000", "shard_00002"))}
    assert extract(images, root, vae_dir) is not None
    after = {f: (os.stat(os.path.join(root, f)).st_mtime_ns, open(os.path.join(root, f), "rb").read())
             for f in before}
    assert after == before
    assert verify_shards(root, progress=False) == {}
    original = np.load(os.path.join(latents, "shard_00001.moments.npy"))
    assert np.array_equal(np.load(os.path.join(root, "shard_00001.moments.npy")), original)


def test_ranks_split_shards(images, vae_dir, tmp_path):
    out = tmp_path / "ranked"
    assert extract(images, out, vae_dir, rank=0, world_size=2) is None  # shards 0 and 2
    assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == ["index.json", "shard_00000.json",
                                                                       "shard_00002.json"]
    assert extract(images, out, vae_dir, rank=1, world_size=2) is not None
    assert verify_shards(str(out), progress=False) == {}


def test_changed_settings_refused(images, vae_dir, latents, tmp_path):
    root = copy_of(latents, tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        extract_latents(images, root, vae_dir, image_size=32, shard_size=3, num_workers=0, progress=False)


def test_missing_inputs(images, vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-ema"):
        extract(images, tmp_path / "o", str(tmp_path / "no_vae"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract(str(tmp_path / "no_images"), tmp_path / "o", vae_dir)


def test_default_shards_give_every_rank_work_and_a_resume_keeps_them(images, vae_dir, tmp_path):
    # 7 images on 2 ranks: shards of ceil(7 / 2) = 4, not one shard of 10,000 for rank 0 alone
    kwargs = dict(image_size=16, batch_size=2, progress=False, num_workers=0, world_size=2)
    assert extract_latents(images, str(tmp_path), vae_dir, rank=0, **kwargs) is None  # rank 1's shard is missing
    index = read_json(tmp_path / "index.json")
    assert index["shard_size"] == 4 and [s["count"] for s in index["shards"]] == [4, 3]
    # a rank of a resumed run on 3 processes takes the index's shard size, not ceil(7 / 3) = 3
    assert extract_latents(images, str(tmp_path), vae_dir, rank=1, **{**kwargs, "world_size": 3}) is not None


def test_the_recorded_scale_is_what_the_dataset_multiplies_and_the_decoder_divides_by(latents, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    from ssm_tread.data.latents import recorded_scale, write_json
    from ssm_tread.sampling import load_vae as load_decoder

    root = copy_of(latents, tmp_path)
    index = read_json(os.path.join(root, "index.json"))
    write_json(os.path.join(root, "index.json"), {**index, "scale_factor": 0.5})  # another VAE's scale
    moments = np.load(os.path.join(root, "shard_00001.moments.npy")).astype(np.float32)
    ds = LatentShardDataset(root, flip=False, sample=False)
    assert np.allclose(ds[4][0].numpy(), moments[1, 0, 0] * 0.5, atol=1e-6)
    assert recorded_scale(root) == 0.5 and recorded_scale(str(tmp_path / "elsewhere")) == 0.18215

    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        expected = vae.decode(z / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(load_decoder(vae_dir, torch.device("cpu"), recorded_scale(root))(z), expected)
