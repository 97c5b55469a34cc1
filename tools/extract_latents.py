"""Pre-extract SD-VAE latents of an ImageFolder tree (ImageNet train) into verified, resumable shards.

    python tools/extract_latents.py --data /data/imagenet/train --out data/imagenet256_latents \
        --vae checkpoints/sd-vae-ft-ema
    torchrun --nproc_per_node=8 tools/extract_latents.py --data ... --out ... --vae ...   # several GPUs
    torchrun --nproc_per_node=8 tools/extract_latents.py --data /data/imagenet/train --image-size 512 \
        --out data/imagenet512_latents --vae checkpoints/sd-vae-ft-ema   # ImageNet-512: 4x64x64 latents
    python tools/extract_latents.py --verify --out data/imagenet256_latents [--vae checkpoints/sd-vae-ft-ema]

The index records the VAE (path and sha256 of its weights) and the settings; a resumed extraction with
another VAE, other settings or other images stops before any work, naming what differs, and so does
--verify given a --vae other than the recorded one. An image that cannot be decoded stops the run, named.
"""
import json
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.cli import ArgumentParser, fail, positive_int, run_tool  # noqa: E402
from ssm_tread.data.extract import extract_latents  # noqa: E402
from ssm_tread.data.latents import index_path, latent_statistics, read_index, verify_shards  # noqa: E402
from ssm_tread.files import weights_sha256  # noqa: E402

DEFAULT_VAE = "checkpoints/sd-vae-ft-ema"


def check_vae(out, vae):
    """Fail unless the index of ``out`` records the VAE at ``vae`` (the sha256 of its config and weights)."""
    index = read_index(out)
    if not os.path.isfile(os.path.join(vae, "config.json")):
        fail(f"--vae {vae}: no VAE there (a diffusers folder with config.json)")
    if "vae_sha256" not in index:
        fail(f"{index_path(out)} records no VAE checksum (written by an older version): cannot check --vae {vae}; "
             f"verify without --vae")
    if weights_sha256(vae) != index["vae_sha256"]:
        fail(f"the latents in {out} were encoded by another VAE than --vae {vae} (the index records "
             f"{index.get('vae')}, sha256 {index['vae_sha256'][:12]})")


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageFolder root: DATA/<class>/<image>")
    p.add_argument("--out", required=True, help="latent directory (index.json + shards)")
    p.add_argument("--vae", help=f"local diffusers AutoencoderKL directory (default {DEFAULT_VAE}); with --verify: "
                                 f"check that the latents come from it")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--shard-size", type=positive_int, help="images per shard (default: the index's when resuming, "
                                                            "else at most 10,000 with a shard for every rank)")
    p.add_argument("--workers", type=int, help="DataLoader workers for image decoding per rank (default: the CPUs "
                                               "each rank has besides its own, at most 4)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--verify", action="store_true", help="check every shard (exists, shapes, finite, checksums)")
    args = p.parse_args()

    if args.verify:
        if args.vae is not None:
            check_vae(args.out, args.vae)
        problems = verify_shards(args.out)
        for name, problem in problems.items():
            print(f"BAD {name}: {problem}")
        if problems:
            fail(f"{len(problems)} bad shard(s) in {args.out}; re-run the extraction to rewrite missing ones "
                 f"(delete a corrupt shard's .json first)")
        print(json.dumps(latent_statistics(args.out)))
        print(f"all shards in {args.out} verified")
        return
    if args.data is None:
        p.error("--data is required (unless --verify)")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device is None and world_size > 1:
        import torch
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    stats = extract_latents(args.data, args.out, args.vae or DEFAULT_VAE, image_size=args.image_size,
                            batch_size=args.batch_size, shard_size=args.shard_size, rank=rank, world_size=world_size,
                            device=device, num_workers=args.workers)
    if stats is not None:
        print(json.dumps(stats))
    print(f"rank {rank}: done" + ("" if stats is not None else " (other ranks' shards still running)"))


if __name__ == "__main__":
    run_tool(main, interrupted="finished shards are kept; run the same command again to continue",
             expected=(FileNotFoundError, ValueError))
