"""Files and the disk: bad latent shards are named when a run opens them; a full disk, a read-only run dir and
Ctrl-C during start-up end in one line with nothing lost; sample.py and eval_fid.py refuse bad arguments
at once. Each case runs the real tool (under a tests/faults.py fault where the fault cannot be staged)."""

import numpy as np
import pytest
from helpers import assert_fails_in_one_line, run_tool
from test_train import TINY

from ssm_tread.data.latents import FORMAT, SAMPLE_BLOCK, SAMPLE_BLOCKS, array_path, write_json, write_shard
from ssm_tread.checkpoint import load_checkpoint

COUNTS = [100, 100, 300]  # images per shard; the last is large enough for gaps between the sampled blocks
LATENT = ["data.name=latents", "log.grid_every=0", "eval.num_samples=0", "data.num_workers=0"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A latent directory as tools/extract_latents.py writes it: 3 shards of 4x8x8 latents, 10 classes."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    shards, start = [], 0
    for k, n in enumerate(COUNTS):
        name = f"shard_{k:05d}"
        moments = rng.standard_normal((n, 2, 2, 4, 8, 8)).astype(np.float16)
        moments[:, :, 1] = abs(moments[:, :, 1])
        write_shard(str(root), name, moments, rng.integers(0, 10, n).astype(np.int64))
        shards.append({"name": name, "start": start, "count": n})
        start += n
    write_json(str(root / "index.json"), {"format": FORMAT, "image_size": 64, "scale_factor": 0.18215,
                                          "latent_shape": [4, 8, 8], "num_images": start, "num_classes": 10,
                                          "classes": [str(c) for c in range(10)], "shards": shards})
    return root


def train_tool(run_dir, *overrides, fault=None):
    return run_tool("tools/train.py", "configs/quickstart.py", *TINY, f"train.run_dir={run_dir}", *overrides,
                    fault=fault)


def test_bad_latent_shards_are_named_when_a_run_opens_them(latents, tmp_path):
    import shutil
    root = shutil.copytree(latents, tmp_path / "latents")
    moments = [array_path(str(root), f"shard_{k:05d}", "moments") for k in range(3)]
    with open(moments[0], "r+b") as f:  # truncated
        f.truncate(10_000)
    data = bytearray(open(moments[1], "rb").read())  # right size, other contents: another shard's latents
    data[128:] = open(moments[2], "rb").read()[128:len(data)]  # (past the 128-byte .npy header)
    open(moments[1], "wb").write(bytes(data))
    done = train_tool(tmp_path / "run", *LATENT, f"data.root={root}")
    assert_fails_in_one_line(done, 1, "latent shard shard_00000", "has 10000 bytes", "(truncated?)",
                             "latent shard shard_00001", "sampled bytes do not match its checksum (corrupt)",
                             "fix: delete the bad shards' .json records", lines=3)
    assert "shard_00002" not in done.stderr
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_full_verification_finds_a_flipped_byte_that_sampling_passes(latents, tmp_path):
    import shutil
    root = shutil.copytree(latents, tmp_path / "latents")
    path = array_path(str(root), "shard_00002", "moments")
    size = len(open(path, "rb").read())
    spacing = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS + 1)
    assert spacing > 2 * SAMPLE_BLOCK  # a gap of unread bytes between sampled blocks
    with open(path, "r+b") as f:
        f.seek(spacing + SAMPLE_BLOCK + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    done = train_tool(tmp_path / "run", *LATENT, f"data.root={root}", "data.verify=full", "train.steps=1")
    assert_fails_in_one_line(done, 1, "latent shard shard_00002", "checksum mismatch (corrupt)", lines=2)


def test_a_full_disk_says_so_and_keeps_the_earlier_checkpoint(tmp_path):
    done = train_tool(tmp_path, "train.steps=2", "train.ckpt_every=1", fault="disk-full-on-second-checkpoint")
    assert_fails_in_one_line(done, 1, "no space left on the device of", "to write step-0000002.pt",
                             "continue with --resume (the earlier checkpoints are intact)")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001.pt"]  # no temp file left
    assert load_checkpoint(tmp_path / "checkpoints" / "step-0000001.pt")["step"] == 1


def test_a_read_only_run_dir_says_so(tmp_path):
    done = train_tool(tmp_path, fault="read-only-run-dir")
    assert_fails_in_one_line(done, 1, f"run dir {tmp_path} is on a read-only file system",
                             "choose a writable train.run_dir")


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    done = train_tool(tmp_path, fault="ctrl-c-during-start-up")
    assert_fails_in_one_line(done, 130, "error: interrupted (Ctrl-C)")
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_sample_refuses_zero_images_at_once(tmp_path):
    done = run_tool("tools/sample.py", tmp_path, "--num-images", "0", "--out", tmp_path / "s.npz")
    assert_fails_in_one_line(done, 2, "error: argument --num-images: 0 must be at least 1")
    assert list(tmp_path.iterdir()) == []


def test_eval_fid_refuses_a_reference_batch_in_the_samples_position(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    done = run_tool("tools/eval_fid.py", tmp_path / "ref.npz", tmp_path / "samples.npz")  # ADM's order
    assert_fails_in_one_line(done, 1, f"{tmp_path / 'ref.npz'} stores mu/sigma: it is a reference batch",
                             "swap the two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "samples.npz"]


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    done = run_tool("tools/eval_fid.py", tmp_path / "ref.npz", tmp_path / "ref.npz", env={"SSM_TREAD_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "swap the two" in done.stderr
