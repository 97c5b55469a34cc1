"""What samples and latents come from, and the files around them: a resumed tools/sample.py or
tools/extract_latents.py refuses another checkpoint, VAE or setting; the shard index is checked against
the shards; a checkpoint without a checksum is named; killed writes leave no temp files after the next
start; bad images, bad outputs and degenerate Inception features end in one line before (or instead of) a
result; every preset config guides the channels its family's official code guides. Each case runs the real
tool: in a subprocess where the one-line output matters, else its main()."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_fails_in_one_line, run_tool, save_tiny_vae
from PIL import Image
from test_reliability_io import latents, train_tool  # noqa: F401  (a fixture and the train tool)

from ssm_tread.checkpoint import load_checkpoint
from ssm_tread.data.extract import extract_latents
from ssm_tread.data.latents import LatentShardError, read_json, write_json
from ssm_tread.train.config import load_config
from ssm_tread.train.trainer import train

sys.path.insert(0, str(ROOT))

SAMPLE_RUN = ["model.name=DiT", "model.kwargs={'hidden_size': 32, 'depth': 2, 'num_heads': 2, 'patch_size': 4}",
              "routing.routes=[]", "train.batch_size=8", "train.steps=1", "log.tensorboard=false",
              "log.progress=false", "eval.num_samples=0", "sample.steps=1", "sample.sampler=euler",
              "sample.batch_size=2"]


def fails_in_one_line_after_a_progress_bar(done, code, *needles):
    """Exit ``code``, one ``error:`` line with every needle, on a line of its own (a progress bar was closed
    first), and no traceback."""
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == code and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: ") and all(needle in errors[0] for needle in needles), errors[0]


def main_of(tool, monkeypatch, *args):
    """Run ``tools/<tool>.py``'s main() with ``args`` in this process (its errors raise)."""
    module = __import__(f"tools.{tool}", fromlist=["main"])
    monkeypatch.setattr(sys, "argv", [f"tools/{tool}.py", *map(str, args)])
    return module.main()


# ---- sampling: the plan of an .npz, its output path, a checkpoint without a checksum ----

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(load_config("configs/quickstart.py", [*SAMPLE_RUN, f"train.run_dir={path}"]))
    return path


def test_a_resumed_sample_job_refuses_other_weights_and_a_finished_npz_is_kept(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s.npz"
    folder = tmp_path / "s.npz.chunks"
    folder.mkdir()
    (folder / ".chunk-000000.npz.tmp-999999").write_bytes(b"torn")  # a killed job's temp files
    (tmp_path / ".s.npz.tmp-999999").write_bytes(b"torn")
    main_of("sample", monkeypatch, run_dir, "--num-images", 4, "--out", out)
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    plan = json.loads(str(np.load(out)["plan"]))
    checkpoint = load_checkpoint(run_dir)
    assert plan["source"]["sha256"] == checkpoint["checksum"] and plan["source"]["weights"] == "ema"
    assert plan["num_images"] == 4 and plan["sample"]["sampler"] == "euler" and plan["sample"]["steps"] == 1
    written = out.read_bytes()

    done = run_tool("tools/sample.py", run_dir, "--num-images", 4, "--out", out, "--raw")
    assert_fails_in_one_line(done, 1, f"{out} already holds 4 samples of another plan", "source.weights ema -> raw",
                             "delete it or choose another --out")
    done = run_tool("tools/sample.py", run_dir, "--num-images", 6, "--out", out)
    assert_fails_in_one_line(done, 1, "num_images 4 -> 6")
    done = run_tool("tools/sample.py", run_dir, "--num-images", 4, "--out", out)
    assert done.returncode == 0 and "already holds these samples" in done.stdout, done.stderr
    assert out.read_bytes() == written


def test_chunks_of_another_checkpoint_are_refused(run_dir, tmp_path, monkeypatch):
    from ssm_tread import sampling

    out = tmp_path / "s.npz"
    model, diffusion, cfg, source = sampling.load_with_source(run_dir, torch.device("cpu"))
    cfg["sample"]["sampler"] = "euler"
    labels = sampling.make_labels(4, model.num_classes, "random", cfg["sample"]["seed"])
    sampling.sample_chunks(model, diffusion, out, labels[:2], 2, cfg["sample"], cfg["sample"]["seed"],
                           source={**source, "sha256": "0" * 64})  # another checkpoint's first chunk
    with pytest.raises(sampling.PlanMismatch, match=r"holds chunks of another plan .*source\.sha256 000000000000 ->"):
        main_of("sample", monkeypatch, run_dir, "--num-images", 4, "--out", out)


def test_a_checkpoint_without_a_checksum_is_named(run_dir, tmp_path):
    state = load_checkpoint(run_dir)
    del state["checksum"], state["path"]
    torch.save(state, tmp_path / "step-0000001.pt")  # as written before checksums, or by hand
    done = run_tool("tools/sample.py", tmp_path / "step-0000001.pt", "--classes", 0, "--per-class", 1,
                    "--out", tmp_path / "g.png")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: checkpoint {tmp_path / 'step-0000001.pt'} has no checksum (written before "
                        f"checksums, or by hand): its contents cannot be verified"]


def test_sample_outputs_are_checked_before_sampling(run_dir, tmp_path):
    done = run_tool("tools/sample.py", run_dir, "--classes", 0, 1, "--out", tmp_path / "x.npz")
    assert_fails_in_one_line(done, 2, "--classes draws a PNG grid: give --out a .png path")
    done = run_tool("tools/sample.py", run_dir, "--num-images", 2, "--out", tmp_path / "x.jpg")
    assert_fails_in_one_line(done, 2, "must end in .png (a grid) or .npz")
    (tmp_path / "file").write_text("")
    for out in ("g.png", "s.npz"):
        done = run_tool("tools/sample.py", run_dir, "--num-images", 2, "--out", tmp_path / "file" / "sub" / out)
        assert_fails_in_one_line(done, 1, f"lies under {str(tmp_path / 'file')!r}, which is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_killed_checkpoint_write_is_cleaned_on_the_next_start(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torn = tmp_path / "checkpoints" / ".step-0000001.pt.tmp-999999"
    torn.write_bytes(b"torn")
    done = train_tool(tmp_path, "train.steps=1")
    assert done.returncode == 0, done.stderr
    assert "removed 1 partial checkpoint file(s)" in done.stdout and not torn.exists()


# ---- extraction: the VAE and the settings a latent directory records; bad images ----

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee"):
        (root / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """Two tiny VAEs with different weights."""
    from diffusers import AutoencoderKL

    first = save_tiny_vae(tmp_path_factory.mktemp("vae_a"))
    other = AutoencoderKL.from_pretrained(first)
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(1.5)
    second = tmp_path_factory.mktemp("vae_b")
    other.save_pretrained(second)
    return first, str(second)


def extract_tool(images, out, vae, *args):
    return run_tool("tools/extract_latents.py", "--data", images, "--out", out, "--vae", vae, "--image-size", 16,
                    "--batch-size", 2, "--shard-size", 2, "--workers", 0, *args)


def test_a_resumed_extraction_refuses_another_vae(image_folder, vaes, tmp_path, monkeypatch, capsys):
    vae_a, vae_b = vaes
    out = tmp_path / "latents"
    extract_latents(str(image_folder), str(out), vae_a, image_size=16, batch_size=2, shard_size=2, num_workers=0,
                    progress=False)
    for suffix in ("json", "moments.npy"):  # shard 1 was being written when the job was killed
        (out / f"shard_00001.{suffix}").rename(out / f"shard_00001.{suffix}.tmp4242")
    (out / "index.json.tmp4242").write_text("{")

    done = extract_tool(image_folder, out, vae_b)
    assert_fails_in_one_line(done, 1, f"{out} holds latents of a different extraction", f"--vae is {vae_b}")
    assert not (out / "shard_00001.json").exists()
    done = extract_tool(image_folder, out, vae_a)
    assert done.returncode == 0, done.stderr
    assert "removed 3 temp file(s) of an interrupted extraction" in done.stdout
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert read_json(out / "shard_00001.json")["vae_sha256"] == read_json(out / "index.json")["vae_sha256"]

    with pytest.raises(SystemExit) as exit_:
        main_of("extract_latents", monkeypatch, "--verify", "--out", out, "--vae", vae_b)
    assert exit_.value.code == 1 and f"encoded by another VAE than --vae {vae_b}" in capsys.readouterr().err
    main_of("extract_latents", monkeypatch, "--verify", "--out", out, "--vae", vae_a)
    assert "verified" in capsys.readouterr().out


def test_verify_finds_shards_of_another_vae(image_folder, vaes, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    extract_latents(str(image_folder), str(out), vaes[0], image_size=16, batch_size=2, shard_size=2, num_workers=0,
                    progress=False)
    record = read_json(out / "shard_00002.json")
    write_json(str(out / "shard_00002.json"), {**record, "vae_sha256": "f" * 64})
    with pytest.raises(LatentShardError, match="latent shards shard_00002 in .* were encoded by another VAE"):
        main_of("extract_latents", monkeypatch, "--verify", "--out", out)


def test_an_unreadable_image_is_named(image_folder, vaes, tmp_path, monkeypatch):
    from ssm_tread.data.extract import ImageError

    images = shutil.copytree(image_folder, tmp_path / "images")
    bad = images / "bee" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # truncated
    done = extract_tool(images, tmp_path / "latents", vaes[0])
    fails_in_one_line_after_a_progress_bar(done, 1, f"error: cannot read image {bad} (", "replace it with a good copy")
    assert sorted(p.name for p in (tmp_path / "latents").iterdir() if p.name.endswith(".json")) == \
        ["index.json", "shard_00000.json", "shard_00001.json"]  # the shards before the bad image are kept
    bad.write_bytes(b"")  # empty
    with pytest.raises(ImageError, match=f"cannot read image {bad} "):
        main_of("extract_latents", monkeypatch, "--data", images, "--out", tmp_path / "latents", "--vae", vaes[0],
                "--image-size", 16, "--batch-size", 2, "--shard-size", 2, "--workers", 0)


# ---- the shard index, checked against the shards ----

def damaged_index(root, damage):
    path = root / "index.json"
    index = read_json(path)
    text = {"truncated": json.dumps(index)[:40], "empty": "", "invalid": "{'format': nan}",
            "no shard list": json.dumps({k: v for k, v in index.items() if k != "shards"}),
            "num_images too large": json.dumps({**index, "num_images": index["num_images"] + 1}),
            "num_images too small": json.dumps({**index, "num_images": index["num_images"] - 100}),
            "num_classes too small": json.dumps({**index, "num_classes": 5, "classes": index["classes"][:5]})}[damage]
    path.write_text(text)
    return path


EXPECTED = {"truncated": "is not valid JSON (truncated or corrupt)", "empty": "is empty",
            "invalid": "is not valid JSON", "no shard list": "lacks shards",
            "num_images too large": "num_images is 501 but its shards hold 500 images",
            "num_images too small": "num_images is 400 but its shards hold 500 images",
            "num_classes too small": "num_classes is 5 but shard_00000 holds labels 0..9"}


@pytest.mark.parametrize("damage", list(EXPECTED))
def test_verify_checks_the_index(latents, tmp_path, monkeypatch, damage):  # noqa: F811
    root = shutil.copytree(latents, tmp_path / "latents")
    path = damaged_index(root, damage)
    with pytest.raises(LatentShardError) as error:
        main_of("extract_latents", monkeypatch, "--verify", "--out", root)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"latent index {path}") and EXPECTED[damage] in message


def test_training_checks_the_index_before_step_1(latents, tmp_path):  # noqa: F811
    root = shutil.copytree(latents, tmp_path / "latents")
    path = damaged_index(root, "num_classes too small")
    done = train_tool(tmp_path / "run", "data.name=latents", f"data.root={root}", "log.grid_every=0",
                      "eval.num_samples=0", "data.num_workers=0")
    assert_fails_in_one_line(done, 1, f"latent index {path}", EXPECTED["num_classes too small"])
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_shard_list_with_a_gap_is_refused(latents, tmp_path):  # noqa: F811
    from ssm_tread.data import LatentShardDataset

    root = shutil.copytree(latents, tmp_path / "latents")
    index = read_json(root / "index.json")
    index["shards"][1]["start"] += 1
    write_json(str(root / "index.json"), index)
    with pytest.raises(LatentShardError, match=r"shard_00001 starts at image 101, expected 100"):
        LatentShardDataset(str(root))


# ---- evaluation: outputs and counts before any work, degenerate features ----

def test_eval_fid_checks_outputs_and_counts_before_any_work(tmp_path, monkeypatch):
    from ssm_tread.files import OutputPathError

    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((5, 8, 8, 3), dtype=np.uint8))
    no_weights = tmp_path / "none.pth"  # loading these would be the first work
    done = run_tool("tools/eval_fid.py", samples, samples, "--inception", no_weights)
    assert_fails_in_one_line(done, 1, "holds 5 samples: the Inception Score needs at least 10")
    np.savez(samples, np.zeros((10, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputPathError, match="which is a file, not a folder"):
        main_of("eval_fid", monkeypatch, samples, samples, "--inception", no_weights, "--out", tmp_path / "file" / "r")
    np.savez(tmp_path / "ref.npz", np.zeros((3, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"holds 3 reference images: precision and recall \(k=3\) need more than 3"):
        main_of("eval_fid", monkeypatch, samples, tmp_path / "ref.npz", "--inception", no_weights)


def test_eval_fid_writes_into_a_missing_folder(tmp_path, monkeypatch):
    import tools.eval_fid

    np.savez(tmp_path / "s.npz", np.zeros((10, 8, 8, 3), dtype=np.uint8))
    results = {"fid": 1.0, "sfid": 2.0, "inception_score": 3.0, "precision": 0.5, "recall": 0.5, "num_samples": 10,
               "reference": "ref.npz"}
    monkeypatch.setattr(tools.eval_fid, "evaluate_npz", lambda *args: results)
    main_of("eval_fid", monkeypatch, tmp_path / "s.npz", tmp_path / "s.npz", "--out", tmp_path / "new" / "r.json")
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == results


def test_untrained_inception_weights_are_refused(tmp_path):
    from ssm_tread.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "untrained.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    done = run_tool("tools/eval_fid.py", tmp_path / "s.npz", tmp_path / "ref.npz", "--inception", weights,
                    "--batch-size", 10)
    fails_in_one_line_after_a_progress_bar(done, 1, "the Inception features of the 10 samples are degenerate",
                             f"the weights in {weights} are not the trained FID Inception")
    assert not (tmp_path / "s.eval.json").exists()


# ---- the preset configs reproduce their family's published evaluation ----

# What each family's official sampling code guides: DiT's forward_with_cfg (facebookresearch/DiT models.py)
# combines eps = model_out[:, :3] only, and TREAD's code inherits it; DiM (tyshiwo1/DiM-DiffusionMamba,
# eval_ldm_discrete.py) guides the whole output; ZigMa (CompVis/zigma) has no guidance: forward_with_cfg raises.
OFFICIAL_GUIDED_CHANNELS = {"DiT": 3, "DiM": None, "ZigMa": None}
# The official evaluations' samplers: DiT 250 DDPM steps (sample_ddp.py), DiM 50 DPM-Solver steps.
OFFICIAL_SAMPLER = {"DiT": ("ddpm", 250), "DiM": ("dpm_solver", 50)}


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "base.py"),
                         ids=lambda p: p.stem)
def test_presets_guide_as_their_family_does(path):
    from ssm_tread.diffusion import create_diffusion

    cfg = load_config(path)
    family = cfg["model"]["name"].split("-")[0]
    assert cfg["sample"]["guided_channels"] == OFFICIAL_GUIDED_CHANNELS[family]
    if family == "ZigMa":
        assert cfg["sample"]["cfg_scale"] == 1.0
    if family in OFFICIAL_SAMPLER and cfg["data"]["name"] == "latents":
        diffusion = create_diffusion(cfg["diffusion"]["objective"], **cfg["diffusion"]["kwargs"])
        sampler = cfg["sample"]["sampler"] or diffusion.default_sampler
        assert (sampler, cfg["sample"]["steps"] or diffusion.default_steps[sampler]) == OFFICIAL_SAMPLER[family]
