"""Pre-extracted VAE latent shards: the on-disk format, its verification, and the training dataset.

A latent directory (written by tools/extract_latents.py) holds

    index.json              the plan: settings, classes, and every shard's name, start and count
    shard_00000.moments.npy float16 [n, 2, 2, C, h, w]: (image, its horizontal flip) x (posterior mean, std)
    shard_00000.labels.npy  int64 [n]
    shard_00000.json        the shard's record, written last: shapes, byte sizes, sha256 checksums (of every
                            byte, and of a sample: the header and blocks spread over the file), and
                            per-channel sums for the latent statistics
    stats.json              per-channel mean/std of the scaled latents, once every shard is done

The index also records what the latents come from: the VAE (its path and ``vae_sha256``, the sha256 of its
config and weights; every shard record repeats the checksum) and the settings. Every file is written
atomically (temporary file + rename), so a shard is finished exactly when its record exists and its arrays
have the recorded sizes. The index is checked against the shards whenever they are opened: its shard list
must cover exactly ``num_images`` images and every label must lie below ``num_classes`` (the label
``num_classes`` is the null class of classifier-free guidance). A run opening the shards checks them as
``verify`` says: "none" the sizes, "sample" (default) also the sampled checksum (a few hundred KiB read per
shard), "full" everything ``--verify`` checks (every byte); a bad shard fails the run at once, named.
"""
import bisect
import hashlib
import io
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ssm_tread.errors import UserError
from ssm_tread.progress import progress_bar

FORMAT = "ssm_tread-latents-v1"
SCALE_FACTOR = 0.18215  # Stable Diffusion's latent scale: extraction records it in index.json as "scale_factor"
SAMPLE_BLOCK, SAMPLE_BLOCKS = 4096, 64  # the sampled checksum reads the header and 64 blocks of 4 KiB
VERIFY_MODES = ("none", "sample", "full")


class LatentShardError(UserError, ValueError):
    """Latent shards that are missing, truncated or corrupt; the message names them and the fix."""


def sample_sha256(f, size):
    """sha256 of the first block of a file object (the .npy header), ``SAMPLE_BLOCKS`` blocks evenly spread
    over the rest and the last block, and the size: a cheap check that catches rewritten or shuffled data."""
    h = hashlib.sha256(str(size).encode())
    last = max(size - SAMPLE_BLOCK, 0)
    for offset in sorted({0, last, *(last * (i + 1) // (SAMPLE_BLOCKS + 1) for i in range(SAMPLE_BLOCKS))}):
        f.seek(offset)
        h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def index_path(root):
    return os.path.join(root, "index.json")


def record_path(root, name):
    return os.path.join(root, f"{name}.json")


def array_path(root, name, kind):
    return os.path.join(root, f"{name}.{kind}.npy")


def write_atomic(path, data):
    """Write bytes to path via a temporary file in the same directory and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=1).encode())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_array(root, name, kind, array):
    """Save one shard array atomically; returns its entry for the shard record (with the sha256)."""
    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    write_atomic(array_path(root, name, kind), data)
    return {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "sample_sha256": sample_sha256(io.BytesIO(data), len(data))}


def write_shard(root, name, moments, labels, vae_sha256=None):
    """moments float16 [n, 2, 2, C, h, w], labels int64 [n] -> arrays, then the shard record (last), which
    names the VAE that encoded them (``vae_sha256``)."""
    m = moments.astype(np.float64)
    mean, std = m[:, :, 0], m[:, :, 1]  # [n, 2, C, h, w]
    sums = {"count": int(mean.size // mean.shape[2]),
            "mean": mean.sum(axis=(0, 1, 3, 4)).tolist(),
            "mean_sq": (mean ** 2).sum(axis=(0, 1, 3, 4)).tolist(),
            "var": (std ** 2).sum(axis=(0, 1, 3, 4)).tolist()}
    record = {"name": name, "count": len(labels),
              "arrays": {"moments": save_array(root, name, "moments", moments),
                         "labels": save_array(root, name, "labels", labels)},
              "sums": sums, "vae_sha256": vae_sha256}
    write_json(record_path(root, name), record)
    return record


def shard_problem(root, shard):
    """Cheap check (no reading of the data): None if the shard is finished, else what is wrong."""
    name = shard["name"]
    if not os.path.exists(record_path(root, name)):
        return "not written (no record; extraction unfinished or interrupted)"
    try:
        record = read_json(record_path(root, name))
    except (OSError, ValueError):
        return "record unreadable"
    if record.get("count") != shard["count"]:
        return f"its record holds {record.get('count')} images, the index says {shard['count']}"
    for kind, entry in record["arrays"].items():
        path = array_path(root, name, kind)
        if not os.path.exists(path):
            return f"{os.path.basename(path)} missing"
        if os.path.getsize(path) != entry["bytes"]:
            return f"{os.path.basename(path)} has {os.path.getsize(path)} bytes, expected {entry['bytes']} (truncated?)"
    return None


def sampled_problem(root, shard):
    """The sizes (:func:`shard_problem`), then the sampled checksum of each array (records written before it
    had one pass on their sizes)."""
    problem = shard_problem(root, shard)
    if problem:
        return problem
    for kind, entry in read_json(record_path(root, shard["name"]))["arrays"].items():
        path = array_path(root, shard["name"], kind)
        if "sample_sha256" in entry:
            with open(path, "rb") as f:
                if sample_sha256(f, entry["bytes"]) != entry["sample_sha256"]:
                    return f"{os.path.basename(path)}: sampled bytes do not match its checksum (corrupt)"
    return None


def file_sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_shard(root, shard, index):
    """Full check of one shard: files, sizes, checksums, shapes, dtypes, finite values, label range."""
    problem = shard_problem(root, shard)
    if problem:
        return problem
    record = read_json(record_path(root, shard["name"]))
    n, (c, h, w) = shard["count"], index["latent_shape"]
    expected = {"moments": ((n, 2, 2, c, h, w), "float16"), "labels": ((n,), "int64")}
    for kind, (shape, dtype) in expected.items():
        path = array_path(root, shard["name"], kind)
        if file_sha256(path) != record["arrays"][kind]["sha256"]:
            return f"{os.path.basename(path)} checksum mismatch (corrupt)"
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            return f"{os.path.basename(path)} unreadable ({e})"
        if arr.shape != shape or str(arr.dtype) != dtype:
            return f"{os.path.basename(path)} is {arr.dtype} {arr.shape}, expected {dtype} {shape}"
        if kind == "moments" and not all(np.isfinite(arr[i:i + 256]).all() for i in range(0, n, 256)):
            return f"{os.path.basename(path)} has non-finite values"
        if kind == "labels" and n and not (0 <= arr.min() and arr.max() < index["num_classes"]):
            return f"{os.path.basename(path)} has labels outside 0..{index['num_classes'] - 1}"
    return None


INDEX_KEYS = ("latent_shape", "num_images", "num_classes", "scale_factor", "shards")
INDEX_FIX = ("delete it and re-run tools/extract_latents.py with the settings of the first run (it rewrites the "
             "index and keeps the finished shards)")


def recorded_scale(root) -> float:
    """The latent scale that the latent directory ``root`` records (what its dataset multiplies by and a decoder
    divides by); :data:`SCALE_FACTOR`, what extraction records, where ``root`` holds no index (sampling a
    checkpoint away from its data)."""
    return read_index(root)["scale_factor"] if os.path.isfile(index_path(root)) else SCALE_FACTOR


def read_index(root):
    """The index of a latent directory, its shape checked (a :class:`LatentShardError` names the file)."""
    path = index_path(root)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no latent index at {path}: the latent directory {root!r} does not exist or was not "
            f"written yet. Create it with\n  python tools/extract_latents.py --data /path/to/imagenet/train "
            f"--out {root} --vae /path/to/sd-vae-ft-ema\n(under torchrun for several GPUs).")
    try:
        index = read_json(path)
    except ValueError:  # JSON or UTF-8 errors
        what = "empty" if os.path.getsize(path) == 0 else "not valid JSON (truncated or corrupt)"
        raise LatentShardError(f"latent index {path} is {what}: {INDEX_FIX}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise LatentShardError(f"{path} is not a {FORMAT} index (format={found!r}); "
                               f"point data.root at the --out folder of tools/extract_latents.py")
    if missing := [k for k in INDEX_KEYS if k not in index]:
        raise LatentShardError(f"latent index {path} lacks {', '.join(missing)}: {INDEX_FIX}")
    shards = index["shards"]
    if not (isinstance(shards, list) and shards and all(isinstance(s, dict) and {"name", "start", "count"} <= set(s)
                                                        for s in shards)):
        raise LatentShardError(f"latent index {path} holds no shard list ('shards': [{{name, start, count}}, ...]): "
                               f"{INDEX_FIX}")
    return index


def check_index(root, index):
    """Check the index against its shards (raises :class:`LatentShardError` naming the file): the shards
    follow each other and hold ``num_images`` images, and every finished shard holds labels below
    ``num_classes`` only and was encoded by the index's VAE."""
    path, start = index_path(root), 0
    for shard in index["shards"]:
        if shard["start"] != start:
            raise LatentShardError(f"latent index {path}: {shard['name']} starts at image {shard['start']}, "
                                   f"expected {start} (the shards must follow each other): {INDEX_FIX}")
        start += shard["count"]
    if start != index["num_images"]:
        raise LatentShardError(f"latent index {path}: num_images is {index['num_images']} but its shards hold "
                               f"{start} images: {INDEX_FIX}")
    classes = index.get("classes")
    if classes is not None and len(classes) != index["num_classes"]:
        raise LatentShardError(f"latent index {path}: num_classes is {index['num_classes']} but it lists "
                               f"{len(classes)} classes: {INDEX_FIX}")
    for shard in index["shards"]:
        if shard_problem(root, shard):
            continue
        labels = np.load(array_path(root, shard["name"], "labels"), mmap_mode="r")
        if len(labels) and not 0 <= labels.min() <= labels.max() < index["num_classes"]:
            raise LatentShardError(
                f"latent index {path}: num_classes is {index['num_classes']} but {shard['name']} holds labels "
                f"{labels.min()}..{labels.max()} (a label num_classes would train as the null class): {INDEX_FIX}")
    if other := other_vae_shards(root, index):
        raise LatentShardError(f"latent shards {', '.join(other)} in {root} were encoded by another VAE than the "
                               f"one {path} names ({index.get('vae')}): delete their .json records and re-run "
                               f"tools/extract_latents.py with that VAE")


def other_vae_shards(root, index):
    """Names of the finished shards whose record names another VAE than the index (both recorded)."""
    if not index.get("vae_sha256"):
        return []
    other = []
    for shard in index["shards"]:
        if os.path.exists(record_path(root, shard["name"])):
            recorded = read_json(record_path(root, shard["name"])).get("vae_sha256")
            if recorded and recorded != index["vae_sha256"]:
                other.append(shard["name"])
    return other


def verify_shards(root, progress=True):
    """Check the index against the shards (:func:`check_index`, which raises), then every shard it lists.
    Returns {shard name: problem} (empty when all are good)."""
    index = read_index(root)
    check_index(root, index)
    problems = {}
    for shard in progress_bar(index["shards"], enabled=progress, desc="verify", unit="shard"):
        problem = check_shard(root, shard, index)
        if problem:
            problems[shard["name"]] = problem
    return problems


def latent_statistics(root):
    """Per-channel mean/std of the scaled latents 0.18215 * (mean + std * eps), over images and flips.

    Uses the sums stored in the shard records: Var[z] = Var[mean] + E[std^2]. Also the std of the
    posterior means alone. Written to stats.json; needs every shard finished.
    """
    index = read_index(root)
    total = {"count": 0, "mean": 0.0, "mean_sq": 0.0, "var": 0.0}
    for shard in index["shards"]:
        sums = read_json(record_path(root, shard["name"]))["sums"]
        for key in total:
            total[key] = total[key] + np.asarray(sums[key], dtype=np.float64)
    n, s = total["count"], index["scale_factor"]
    mean = total["mean"] / n
    var_means = np.maximum(total["mean_sq"] / n - mean ** 2, 0.0)
    stats = {"scale_factor": s, "count_per_channel": int(n),
             "mean": (s * mean).tolist(),
             "std": (s * np.sqrt(var_means + total["var"] / n)).tolist(),
             "std_of_posterior_means": (s * np.sqrt(var_means)).tolist()}
    write_json(os.path.join(root, "stats.json"), stats)
    return stats


class LatentShardDataset(Dataset):
    """Memory-mapped latent shards -> (latent float [C, h, w], label long), C x h x w = 4x32x32 for ImageNet-256.

    Each item picks the image or its flip with p=0.5 (flip=True) and draws a fresh posterior sample
    mean + std * eps (sample=True; else the mean), times ``scale_factor`` (None: the one index.json records,
    which the VAE decoder divides by again: :func:`recorded_scale`). Randomness comes from torch's global
    generator (DataLoader workers get distinct seeds). Opening checks the shards as ``verify`` says ("none",
    "sample", "full"; see the module) and raises :class:`LatentShardError` naming every bad one; ``progress``:
    a bar over the shards for "full".
    """

    def __init__(self, root, flip=True, sample=True, scale_factor=None, verify="sample", progress=True):
        index = read_index(root)
        self.root, self.flip, self.sample = root, flip, sample
        self.scale_factor = index["scale_factor"] if scale_factor is None else scale_factor
        check = {"none": shard_problem, "sample": sampled_problem,
                 "full": lambda root, shard: check_shard(root, shard, index)}[verify]
        shards = progress_bar(index["shards"], enabled=verify == "full" and progress, desc="verify shards", unit="shard")
        problems = {s["name"]: p for s in shards if (p := check(root, s))}
        if problems:
            listing = "\n".join(f"latent shard {name} in {root}: {p}" for name, p in problems.items())
            raise LatentShardError(
                f"{listing}\nfix: delete the bad shards' .json records and re-run tools/extract_latents.py "
                f"(it rewrites only those), or check every shard with --verify --out {root}")
        check_index(root, index)
        self.shards = index["shards"]
        self.starts = [s["start"] for s in self.shards]
        self.num_images = index["num_images"]
        self.channels, self.image_size = index["latent_shape"][0], index["latent_shape"][1]
        self.num_classes = index["num_classes"]
        self.classes = index["classes"]
        self._arrays = {}

    def __len__(self):
        return self.num_images

    def __getstate__(self):  # memory maps are reopened in each DataLoader worker
        return {**self.__dict__, "_arrays": {}}

    def _open(self, k):
        if k not in self._arrays:
            name = self.shards[k]["name"]
            self._arrays[k] = (np.load(array_path(self.root, name, "moments"), mmap_mode="r"),
                               np.load(array_path(self.root, name, "labels"), mmap_mode="r"))
        return self._arrays[k]

    def __getitem__(self, i):
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        moments, labels = self._open(k)
        j = i - self.starts[k]
        flip = int(self.flip and torch.rand(()) < 0.5)
        mean, std = torch.from_numpy(np.asarray(moments[j, flip], dtype=np.float32))  # [2, C, h, w] -> 2x [C, h, w]
        z = mean + std * torch.randn_like(std) if self.sample else mean
        return z * self.scale_factor, torch.tensor(int(labels[j]), dtype=torch.long)
