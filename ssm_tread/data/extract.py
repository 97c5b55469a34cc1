"""Extract VAE posterior moments of an ImageFolder tree into latent shards (see latents.py for the format).

Each image is ADM-centre-cropped to image_size, scaled to [-1, 1], and encoded with and without a
horizontal flip; the posterior mean and std are stored in float16. Shards are independent: rank r of
world_size processes shards r, r + world_size, ...; finished shards are skipped, so a run can be resumed.
A resumed run must be the same extraction: same images, settings and VAE (its weights' sha256), else it
stops before any work, naming what differs. An image that cannot be decoded (truncated, empty, not an
image) stops the run, named: skipping it would change the image list that the index records.
"""
import hashlib
import os
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssm_tread.errors import UserError
from ssm_tread.files import remove_temp_files, weights_sha256
from ssm_tread.machine import loader_workers, node_ranks, share
from ssm_tread.progress import progress_bar

from .latents import FORMAT, SCALE_FACTOR, index_path, latent_statistics, other_vae_shards, read_index, \
    shard_problem, write_json, write_shard
from .transforms import adm_center_crop

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's ImageFolder's
VAE_HINT = ("download the Stable Diffusion VAE once, e.g.\n"
            "  huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}\n"
            "(a directory with config.json and diffusion_pytorch_model.safetensors)")


def list_image_folder(root):
    """ImageFolder layout root/<class>/<image> -> (classes sorted, [(relative path, label)] sorted)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image directory {root!r} does not exist (expected ImageFolder layout "
                                f"root/<class name>/<image>, e.g. ImageNet's train/ folder)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.relpath(os.path.join(dirpath, f), root), label))
    if not samples:
        raise FileNotFoundError(f"no images found under {root!r} (expected root/<class name>/<image> with one "
                                f"of the extensions {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded; the message names it."""


class CenterCropImages(Dataset):
    """(relative path, label) list -> (image float [3, S, S] in [-1, 1], label, error). ``error`` is "" or, for
    a file that cannot be decoded, why (the image is then zeros): a worker process cannot raise it in one line."""

    def __init__(self, root, samples, image_size):
        self.root, self.samples, self.image_size = root, samples, image_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(os.path.join(self.root, path)) as image:
                image = adm_center_crop(image.convert("RGB"), self.image_size)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated, empty and foreign files
            return torch.zeros(3, self.image_size, self.image_size), label, f"{type(e).__name__}: {e}"
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1  # [3, S, S]
        return x, label, ""


def load_vae(path, device="cpu"):
    """diffusers AutoencoderKL from a local directory (never downloads)."""
    from diffusers import AutoencoderKL
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no VAE at {path!r}: " + VAE_HINT.format(path=path))
    return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()


MAX_SHARD_SIZE = 10000  # images per shard by default


def plan_index(classes, samples, vae, image_size, shard_size, image_root, vae_path):
    """The extraction plan written to index.json: settings, classes, and the shards."""
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % down:
        raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {down}: "
                         f"use e.g. {image_size // down * down or down} (256 and 512 for ImageNet)")
    listing = "\n".join(f"{p}\t{y}" for p, y in samples).encode()
    shards = [{"name": f"shard_{k:05d}", "start": start, "count": min(shard_size, len(samples) - start)}
              for k, start in enumerate(range(0, len(samples), shard_size))]
    index = {"format": FORMAT, "image_size": image_size, "scale_factor": SCALE_FACTOR,
             "latent_shape": [vae.config.latent_channels, image_size // down, image_size // down],
             "num_images": len(samples), "num_classes": len(classes), "classes": classes,
             "shard_size": shard_size, "source": os.path.abspath(image_root), "vae": os.path.abspath(vae_path),
             "vae_sha256": weights_sha256(vae_path), "files_sha256": hashlib.sha256(listing).hexdigest(),
             "shards": shards}
    return index


PLAN_KEYS = ("format", "image_size", "latent_shape", "shard_size", "num_images", "classes", "files_sha256")


def write_or_check_index(out_dir, index, write=True):
    """Write index.json (``write``: this process is the one that writes it), or check that an existing one (a
    run being resumed) has the same plan and VAE, and that its finished shards come from that VAE."""
    path = index_path(out_dir)
    if not os.path.exists(path):
        if write:
            write_json(path, index)
        return
    old = read_index(out_dir)
    changed = [k for k in PLAN_KEYS if old.get(k) != index[k]]
    if old.get("vae_sha256"):
        same_vae = old["vae_sha256"] == index["vae_sha256"]
    else:  # an index written before VAE checksums: its path is all there is
        same_vae = old.get("vae") == index["vae"]
    if not same_vae:
        changed.append(f"VAE: {old.get('vae')} (sha256 {str(old.get('vae_sha256'))[:12]}) was used, --vae is "
                       f"{index['vae']} (sha256 {index['vae_sha256'][:12]})")
    if changed:
        raise ValueError(f"{out_dir} holds latents of a different extraction (differs in {'; '.join(changed)}): "
                         f"resume with the first run's settings, or use another --out directory")
    if other := other_vae_shards(out_dir, index):
        raise ValueError(f"{out_dir}: shards {', '.join(other)} were encoded by another VAE than --vae "
                         f"{index['vae']}; delete their .json records, or use another --out directory")


@torch.no_grad()
def encode_moments(vae, x):
    """x [B, 3, S, S] in [-1, 1] -> float16 [B, 2 (image, flip), 2 (mean, std), C, h, w]."""
    posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    moments = torch.stack([posterior.mean, posterior.std], dim=1)  # [2B, 2, C, h, w]
    return moments.unflatten(0, (2, len(x))).transpose(0, 1).half().cpu().numpy()


def extract_latents(image_root, out_dir, vae_path, image_size=256, batch_size=32, shard_size=None,
                    rank=0, world_size=1, device=None, num_workers=None, progress=True):
    """Extract this rank's unfinished shards. Returns the statistics dict once every shard is done, else None.

    ``shard_size`` None: the index's when resuming, else at most 10,000 images with every rank given some;
    ``num_workers`` None: the loader workers the machine has for each of the ranks on this node."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classes, samples = list_image_folder(image_root)
    if shard_size is None:
        existing = read_index(out_dir) if os.path.exists(index_path(out_dir)) else {}
        shard_size = existing.get("shard_size") or share(MAX_SHARD_SIZE, len(samples), world_size)
    num_workers = loader_workers(node_ranks()) if num_workers is None else num_workers
    vae = load_vae(vae_path, device)
    index = plan_index(classes, samples, vae, image_size, shard_size, image_root, vae_path)
    os.makedirs(out_dir, exist_ok=True)
    write_or_check_index(out_dir, index, write=rank == 0)
    todo = [s for s in index["shards"][rank::world_size] if shard_problem(out_dir, s)]
    # the temp files of a killed run's writes: each rank those of the shards it (re)writes, rank 0 the index's
    partial = [re.escape(s["name"]) + r"\.(moments\.npy|labels\.npy|json)" for s in todo]
    partial += [r"index\.json", r"stats\.json"] if rank == 0 else []
    if partial and (removed := remove_temp_files(out_dir, rf"({'|'.join(partial)})\.tmp\d+")):
        print(f"rank {rank}: removed {len(removed)} temp file(s) of an interrupted extraction ({removed[0]})")
    with progress_bar(total=sum(s["count"] for s in todo), enabled=progress, desc=f"rank {rank}", unit="img",
                      position=rank) as bar:  # closed before an error is printed
        for shard in todo:
            images = CenterCropImages(image_root, samples[shard["start"]:shard["start"] + shard["count"]], image_size)
            loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers,
                                pin_memory=device.type == "cuda")
            moments, labels = [], []
            for x, y, errors in loader:
                if bad := [k for k, error in enumerate(errors) if error]:
                    path, _ = images.samples[sum(map(len, labels)) + bad[0]]
                    raise ImageError(f"cannot read image {os.path.join(image_root, path)} ({errors[bad[0]]}): "
                                     f"replace it with a good copy and run the same command again (finished shards "
                                     f"are kept; removing it changes the image list, which needs a new --out)")
                moments.append(encode_moments(vae, x.to(device, non_blocking=True)))
                labels.append(y.numpy())
                bar.update(len(y))
            write_shard(out_dir, shard["name"], np.concatenate(moments), np.concatenate(labels).astype(np.int64),
                        index["vae_sha256"])
    if any(shard_problem(out_dir, s) for s in index["shards"]):
        return None
    return latent_statistics(out_dir)
