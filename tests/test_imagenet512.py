"""The ImageNet-512 protocol at toy scale: 64x64x4 latents (a 32x32 patch grid at patch 2).

- The official 512 layouts load: DiT-XL-2-512x512.pt's keys and shapes (its pos_embed the fixed 32x32
  sin-cos of the reference code), DiM-H/2's ImageNet-512 fine-tune (position embedding of 2 + 1024 rows,
  the "rho_pad" padding of configs/imagenet512_H_DiM_ft.py) and ZigMa on the 32x32 grid, each checked
  against the plain re-implementations of the official forward passes in test_dit.py and
  test_official.py, on random weights.
- The 512 configs build their models on 64x64 latents; the visualiser's padded DiM grid is the one the
  model reads; the planning table's memory count on the meta device equals the count of a real forward.
- A 512-style run end to end: a few images at 512 x 512, extracted to 64x64x4 latents by a VAE of Stable
  Diffusion's architecture at a small width, two training steps, sampling and evaluation against a
  reference batch laid out as ADM's VIRTUAL_imagenet512.npz.
"""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_dit import reference_forward, reference_keys, reference_pos_embed
from test_official import (
    CLASSES,
    PARITY_TOLERANCE,
    REFERENCE_DTYPE,
    dim_layout,
    dim_reference,
    in_reference_dtype,
    inputs,
    random_state,
    zigma_layout,
    zigma_reference,
)
from test_train_eval import eval_rows, inception  # noqa: F401  (inception: a module fixture)

from ssm_tread import viz
from ssm_tread.data.extract import extract_latents
from ssm_tread.data.latents import read_json
from ssm_tread.eval.adm import REFERENCE_BATCHES, evaluate_npz
from ssm_tread.models import count_macs, create_model, load_official
from ssm_tread.models.dim import NUM_PREFIX
from ssm_tread.models.layers import sincos_2d
from ssm_tread.models.official import infer_kwargs, to_official
from ssm_tread.sampling import load_for_sampling
from ssm_tread.train.config import ConfigError, load_config, model_spec
from ssm_tread.train.evaluation import check_eval_config
from ssm_tread.train.trainer import train
from tools.bench.plan import activation_bytes, plan_row, plan_table
from tools.bench.specs import RandomLatents
from tools.convert_checkpoint import convert

LATENT, GRID = 64, 32  # ImageNet-512: 64x64x4 latents, a 32x32 grid of patch tokens at patch 2
CONFIGS_512 = ["dit_xl2_512", "dit_xl2_512_tread", "dim_h_512", "dim_h_512_tread", "zigma_b2_512", "zigma_b2_512_tread"]


# ---- DiT-XL/2 at 512: the official checkpoint's layout ----


def test_dit_xl2_at_512_has_the_official_checkpoint_layout():
    """DiT-XL-2-512x512.pt: DiT-XL/2 (28 blocks, width 1152) with 32 x 32 = 1,024 position rows."""
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=LATENT)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference_keys(depth=28, hidden=1152, patch=2, channels=4, classes=1000, tokens=GRID * GRID)
    assert not model.pos_embed.requires_grad  # fixed, as in the reference: loaded from the file, never trained


def test_dit_pos_embed_at_512_is_the_reference_32x32_sincos():
    ours = sincos_2d(1152, (GRID, GRID))
    np.testing.assert_allclose(ours, reference_pos_embed(1152, GRID), rtol=0, atol=1e-12)


def test_a_dit_checkpoint_in_the_512_layout_loads_strictly_and_computes_the_reference_forward():
    size = dict(depth=2, hidden=64, patch=2, channels=4, classes=CLASSES, tokens=GRID * GRID)
    state = random_state(reference_keys(**size), seed=3)
    state["pos_embed"] = torch.from_numpy(reference_pos_embed(64, GRID)).float()[None]
    model = create_model("DiT", input_size=LATENT, hidden_size=64, depth=2, num_heads=4, num_classes=CLASSES)
    model.load_state_dict(state, strict=True)
    model = model.eval().to(REFERENCE_DTYPE)
    x, t01, y = inputs(LATENT)
    with torch.no_grad():
        out = model(x.to(REFERENCE_DTYPE), 1000 * t01, y)
        expected = reference_forward(in_reference_dtype(state), x.to(REFERENCE_DTYPE), 1000 * t01, y, patch=2, heads=4,
                                     out_channels=8)
    assert out.shape == (2, 8, LATENT, LATENT) and expected.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=PARITY_TOLERANCE)


def test_dit_xl2_at_512_costs_the_published_gflops():
    """DiT's README: DiT-XL/2 at 512 x 512, 525 Gflops (multiply-accumulates of one forward)."""
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=LATENT)
    assert round(count_macs(model, routed=False) / 1e9) == 525


def test_an_official_dit_512_checkpoint_converts_and_samples(tmp_path):
    """DiT's training checkpoints hold "model" and "ema" (the released files the EMA alone): the EMA is taken,
    the sizes read off the weights, the heads from the preset (here given: width 64 is no preset)."""
    shapes = reference_keys(depth=2, hidden=64, patch=2, channels=4, classes=CLASSES, tokens=GRID * GRID)
    ema, raw = random_state(shapes, seed=4), random_state(shapes, seed=5)
    torch.save({"model": raw, "ema": ema}, tmp_path / "DiT-512.pt")
    with pytest.raises(ValueError, match="give it .--set num_heads=N."):
        convert("dit", str(tmp_path / "DiT-512.pt"), str(tmp_path / "bad.pt"))
    out = tmp_path / "run" / "checkpoints" / "step-0000000.pt"
    convert("dit", str(tmp_path / "DiT-512.pt"), str(out), model_overrides={"num_heads": 4})
    model, _, cfg = load_for_sampling(tmp_path / "run", torch.device("cpu"))
    assert (model.input_size, model.num_classes, model.learn_sigma) == (LATENT, CLASSES, True)
    assert cfg["_name"] == "dit_xl2_512" and cfg["sample"]["guided_channels"] == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    with torch.device("meta"):
        xl = {k: torch.empty(v) for k, v in reference_keys(28, 1152, 2, 4, 1000, GRID * GRID).items()}
    assert infer_kwargs("DiT", xl)["num_heads"] == 16  # DiT-XL/2's, from the preset


# ---- DiM-H/2's ImageNet-512 fine-tune ----


def test_dim_h_at_512_exports_the_official_fine_tune_layout():
    """Every key and shape of the official 512 fine-tune (position embedding [1, 2 + 1024, 1536])."""
    with torch.device("meta"):
        model = create_model("DiM-H/2", input_size=LATENT, pad_layout="rho_pad")
    layout = dim_layout(1536, 49, LATENT, classes=1000)
    assert layout["additional_embed"] == (1, 2 + GRID * GRID, 1536)
    assert {k: tuple(v.shape) for k, v in to_official("DiM", model.state_dict()).items()} == layout
    # the ImageNet-256 model's 862,407,184 parameters plus the 768 more position rows of the 32x32 grid
    assert sum(p.numel() for p in model.parameters()) == 862_407_184 + 768 * 1536


@pytest.fixture(scope="module")
def dim_512_official():
    """A random official DiM in the 512 fine-tune's layout, small (width 32, 3 blocks): 64x64x4 latents."""
    return random_state(dim_layout(32, 3, LATENT), seed=5)


def test_the_dim_512_fine_tune_loads_with_its_padding_and_computes_the_official_forward(dim_512_official):
    model = load_official("DiM", dim_512_official).eval().to(REFERENCE_DTYPE)
    assert (model.input_size, model.padded_size, model.seq_len) == (LATENT, (35, 35), 5 + 35 * 35)
    x, t01, y = inputs(LATENT)
    x, t = x.to(REFERENCE_DTYPE), (t01 * 1000).round()
    state = in_reference_dtype(dim_512_official)
    with torch.no_grad():
        ours = model(x, t, y)
        reference = dim_reference(state, x, t, y, 3, pad_layout="rho_pad")
        lateral = dim_reference(state, x, t, y, 3, pad_layout="lateral")
    assert reference.abs().mean() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=PARITY_TOLERANCE)
    assert (lateral - reference).abs().max() > 1e-3  # the 256 configs' padding would compute another function


def test_rho_pad_differs_from_lateral_only_in_the_padding_rows():
    """On a 32-wide grid the padding cells of row h + r (below the image) take pads (32 r + j) mod 3, not r."""
    lateral = create_model("DiM", input_size=LATENT, hidden_size=32, depth=3, num_classes=CLASSES).pad_index
    rho = create_model("DiM", input_size=LATENT, hidden_size=32, depth=3, num_classes=CLASSES,
                       pad_layout="rho_pad").pad_index
    rows = torch.arange(35 * 35) // 35
    assert torch.equal(lateral[rows < GRID], rho[rows < GRID])
    cells = torch.arange(35)
    for r in range(3):
        assert (lateral[rows == GRID + r] == r).all()
        assert torch.equal(rho[rows == GRID + r], (32 * r + cells) % 3)
    with pytest.raises(ValueError, match="unknown pad_layout 'diagonal'"):
        create_model("DiM", input_size=16, hidden_size=32, depth=3, pad_layout="diagonal")


def test_the_converted_512_fine_tune_samples_with_the_official_512_conventions(dim_512_official, tmp_path):
    torch.save({"ema": dim_512_official}, tmp_path / "nnet_ema.pth")
    out = convert("dim", str(tmp_path / "nnet_ema.pth"), str(tmp_path / "run" / "checkpoints" / "step-0000000.pt"))
    state = torch.load(out, weights_only=True)
    cfg = state["config"]
    assert state["model_kwargs"]["pad_layout"] == "rho_pad" and cfg["model"]["kwargs"]["pad_layout"] == "rho_pad"
    assert cfg["_name"] == "dim_h_512" and cfg["data"]["root"] == "data/imagenet512_latents"
    # configs/imagenet512_H_DiM_ft.py samples with 50 DPM-Solver steps at scale 0.7: eps_c + 0.7 (eps_c - eps_u)
    assert (cfg["sample"]["sampler"], cfg["sample"]["steps"], cfg["sample"]["cfg_scale"]) == ("dpm_solver", 50, 1.7)
    reference = load_official("DiM", dim_512_official).state_dict()
    assert all(torch.equal(state["ema"][k], v) for k, v in reference.items())


# ---- ZigMa on the 32x32 grid ----


def test_zigma_on_the_32x32_grid_computes_the_official_forward():
    official = random_state(zigma_layout(32, 3, LATENT), seed=7)
    model = load_official("ZigMa", official).eval().to(REFERENCE_DTYPE)
    assert model.input_size == LATENT and model.grid_size == (GRID, GRID)
    x, t01, y = inputs(LATENT)
    x = x.to(REFERENCE_DTYPE)
    with torch.no_grad():
        ours = model(x, 1000 * t01, y)
        reference = zigma_reference(in_reference_dtype(official), x, t01, y, 3)
    assert reference.abs().mean() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=PARITY_TOLERANCE)


# ---- the 512 configs, the visualiser's padded grid, the planning table's memory count ----


@pytest.mark.parametrize("name", CONFIGS_512)
def test_512_configs_build_their_model_on_64x64_latents(name):
    cfg = load_config(f"configs/{name}.py")
    base = load_config(f"configs/{name.replace('_512', '')}.py")
    assert cfg["data"]["root"] == "data/imagenet512_latents"
    assert os.path.basename(cfg["eval"]["reference"]) == REFERENCE_BATCHES[512][0]
    assert cfg["routing"]["routes"] == base["routing"]["routes"] and cfg["model"]["name"] == base["model"]["name"]
    model_name, kwargs = model_spec(cfg, RandomLatents(image_size=LATENT))
    with torch.device("meta"):
        model = create_model(model_name, **kwargs)
    assert model.grid_size == (GRID, GRID)
    if model_name.startswith("DiM"):
        assert kwargs["pad_layout"] == "rho_pad" and model.seq_len == NUM_PREFIX + 35 * 35


def test_a_missing_512_reference_batch_is_named_with_its_download():
    cfg = load_config("configs/dit_xl2_512.py", ["eval.num_samples=50000"])
    with pytest.raises(ConfigError, match=r"VIRTUAL_imagenet512.npz': not found; .*ref_batches/imagenet/512/"
                                          r"VIRTUAL_imagenet512\.npz\)"):
        check_eval_config(cfg)


def test_the_visualisers_padded_dim_grid_is_the_one_the_model_reads():
    h, w = 5, 4
    model = create_model("DiM", input_size=(2 * h, 2 * w), hidden_size=32, depth=3, num_classes=CLASSES)
    keep = viz.keep_subset(h, w, 0.5, seed=1)
    padded = viz.padded_keep(keep, h, w)
    cells = model.grid_positions - NUM_PREFIX  # where each image token sits in the padded grid
    assert torch.equal(padded[:len(keep)], cells[keep])
    padding = torch.ones((h + 3) * (w + 3), dtype=torch.bool)
    padding[cells] = False
    assert torch.equal(padded[len(keep):], padding.nonzero().squeeze(1))


@pytest.mark.parametrize("name, kwargs", [
    ("DiT", dict(hidden_size=32, depth=3, num_heads=2, routes=[(1, 1, 0.5)])),
    ("DiM", dict(hidden_size=32, depth=3, routes=[(1, 1, 0.5)])),
    ("ZigMa", dict(hidden_size=32, depth=3, routes=[(1, 1, 0.5)])),
])
def test_the_memory_count_on_the_meta_device_equals_a_real_forwards(name, kwargs):
    """In float32: in bf16 the CPU's layer norm keeps its row statistics in bf16, the meta device (like CUDA) in fp32."""
    model = create_model(name, input_size=16, num_classes=CLASSES, **kwargs)
    with torch.device("meta"):
        meta = create_model(name, input_size=16, num_classes=CLASSES, **kwargs)
    for routed in (False, True):
        real = activation_bytes(model, routed, torch.float32)
        assert real > 0 and activation_bytes(meta, routed, torch.float32) == real
    assert activation_bytes(meta, True) < activation_bytes(meta, False)


def test_a_planning_row_has_the_published_dit_figures():
    """DiT-S/2 at 256: 32,963,360 parameters and 6.06 GMACs (the DiT paper); TREAD's route 2 -> 8 at ratio 0.5
    runs 7 of the 12 blocks on half the tokens: 12 / (5 + 7 / 2) = 1.41 for the blocks' linear work, a little
    more with attention's quadratic part."""
    row = plan_row("dit_s2", 256)
    assert (row.model, row.tokens, row.params, round(row.macs / 1e9, 2)) == ("DiT-S/2", 256, 32_963_360, 6.06)
    assert row.routes == [(2, 8, 0.5)] and 1.41 < row.speedup < 1.5
    assert row.training_state == 20 * row.params and row.activations_tread < row.activations
    assert "| DiT-S/2 | 256 | 256 | 2 -> 8 at 0.5 | 33.0M | 6.06 |" in plan_table([row])
    with pytest.raises(ValueError, match="resolution 384"):
        plan_row("dit_s2", 384)


# ---- a 512-style run end to end ----

IMAGE_SIZES = {"ant": [(700, 520), (512, 512)], "bee": [(520, 900), (1100, 600)]}  # (w, h): all cropped to 512


def save_sd_vae(path):
    """A random AutoencoderKL of Stable Diffusion's architecture (4 resolutions, 8x down, 2 ResNet layers a block,
    an attention mid-block, 4 latent channels) at 1/16 of its width (8, 16, 32, 32 instead of 128, 256, 512, 512)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=4,
                  sample_size=512).save_pretrained(path)
    return str(path)


def test_a_512_run_extracts_trains_samples_and_evaluates(tmp_path, inception):  # noqa: F811
    _, inception_path = inception
    images = tmp_path / "train"
    rng = np.random.default_rng(0)
    for cls, sizes in IMAGE_SIZES.items():
        (images / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    vae = save_sd_vae(tmp_path / "vae")
    latents = tmp_path / "latents"
    assert extract_latents(str(images), str(latents), vae, image_size=512, batch_size=2, shard_size=4, num_workers=0,
                           progress=False) is not None
    index = read_json(latents / "index.json")
    assert index["image_size"] == 512 and index["latent_shape"] == [4, LATENT, LATENT]
    moments = np.load(latents / "shard_00000.moments.npy")
    # (image, flip) x (mean, std) x 4 x 64 x 64 in float16: 128 KiB an image (README, "ImageNet-512")
    assert moments.shape == (4, 2, 2, 4, LATENT, LATENT) and moments.dtype == np.float16
    assert moments[0].nbytes == 128 * 1024

    # ADM's VIRTUAL_imagenet512.npz holds 512 x 512 images (arr_0) and their Inception statistics
    g = np.random.default_rng(1)
    a = g.standard_normal((2048, 8)) * 0.01
    reference = tmp_path / REFERENCE_BATCHES[512][0]
    np.savez(reference, g.integers(0, 256, (4, 512, 512, 3), dtype=np.uint8), mu=g.uniform(0.2, 0.3, 2048),
             sigma=a @ a.T + 1e-4 * np.eye(2048))
    tiny = ["model.name=DiT", "model.kwargs={'hidden_size': 32, 'depth': 2, 'num_heads': 2, 'patch_size': 2}",
            "routing.routes=[(0, 1, 0.5)]", "train.batch_size=2", "train.steps=2", "train.ckpt_every=0",
            "log.every=1", "log.tensorboard=false", "log.progress=false", "log.grid_every=0", "data.num_workers=0",
            "sample.steps=2", "sample.batch_size=2", "sample.grid_classes=[1]", "sample.grid_per_class=1",
            "eval.num_samples=2", f"eval.inception={inception_path}", f"eval.reference={reference}",
            f"data.root={latents}", f"sample.vae={vae}", f"train.run_dir={tmp_path / 'run'}"]
    summary = train(load_config("configs/dit_xl2_512_tread.py", tiny))
    assert summary["step"] == 2 and math.isfinite(summary["eval"]["fid"])
    assert list(eval_rows(tmp_path / "run")) == [2]
    with Image.open(tmp_path / "run" / "samples.png") as grid:
        assert min(grid.size) >= 512  # one decoded 512 x 512 sample


def test_an_image_size_the_vae_cannot_halve_down_is_refused_before_any_work(tmp_path):
    from helpers import save_tiny_vae  # 2x down

    (tmp_path / "images" / "ant").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "ant" / "0.png")
    with pytest.raises(ValueError, match="--image-size 17 is not a multiple of the VAE's downsampling factor 2"):
        extract_latents(str(tmp_path / "images"), str(tmp_path / "out"), save_tiny_vae(tmp_path / "vae"), image_size=17,
                        num_workers=0, progress=False)
    assert not (tmp_path / "out").exists()


class MeanColours:
    """A stand-in feature extractor for the ADM suite's shapes: mean colours of 8 x 8 blocks."""

    def features(self, images):
        x = torch.as_tensor(np.asarray(images)).float().permute(0, 3, 1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)  # [B, 192]
        return {"pool": pooled, "spatial": pooled[:, ::2], "logits": pooled[:, :10]}


def test_the_adm_suite_takes_512_batches(tmp_path):
    g = np.random.default_rng(2)
    np.savez(tmp_path / "samples.npz", g.integers(0, 256, (10, 512, 512, 3), dtype=np.uint8))
    np.savez(tmp_path / REFERENCE_BATCHES[512][0], g.integers(0, 256, (5, 512, 512, 3), dtype=np.uint8))
    results = evaluate_npz(tmp_path / "samples.npz", tmp_path / REFERENCE_BATCHES[512][0], extractor=MeanColours(),
                           progress=False, batch_size=4)
    assert results["num_samples"] == 10 and results["num_reference_images"] == 5 and results["fid"] > 0
    np.savez(tmp_path / "ref256.npz", g.integers(0, 256, (5, 256, 256, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="samples are 512x512 images but the reference images are 256x256"):
        evaluate_npz(tmp_path / "samples.npz", tmp_path / "ref256.npz", extractor=MeanColours(), progress=False)
