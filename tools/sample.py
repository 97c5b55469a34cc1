"""Sample from a trained model: a PNG grid for chosen classes, or N images in an ADM-format .npz.

    python tools/sample.py runs/quickstart --classes 0 1 2 3 --per-class 8 --out grid.png
    python tools/sample.py runs/zigma_official --num-images 64 --out grid.png   # random labels, or none
    torchrun --nproc_per_node=8 tools/sample.py runs/dit_xl2_tread --num-images 50000 --out samples.npz \\
        --cfg-scale 1.5 --labels balanced

CHECKPOINT is a checkpoint file or a run directory (its newest checkpoint). Sampling settings default
to the run's `sample` config; the options below override them. An .npz records its plan: the checkpoint
(sha256, EMA or raw), the VAE, the sampler and its settings, the guidance, N, the labels and the seed. A
restarted .npz job skips the chunks it already finished, and refuses, naming what differs, when the
checkpoint or a setting changed; a finished .npz is never overwritten. An unconditional model (e.g. a
converted official ZigMa) takes --num-images, not --classes, and needs --cfg-scale 1; its .npz has no
labels (arr_1).
"""
import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads slow a run many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.cli import ArgumentParser, positive_int, run_tool


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint file or run directory")
    parser.add_argument("--out", required=True, help="output .png (a grid) or .npz (--num-images)")
    parser.add_argument("--classes", type=int, nargs="+", help="grid: one row per class")
    parser.add_argument("--per-class", type=positive_int, default=8, help="grid: samples per class (per row)")
    parser.add_argument("--num-images", type=positive_int, help="number of images (an .npz, or a grid for a .png)")
    parser.add_argument("--labels", choices=["random", "balanced"], default="random", help="label draw for --num-images")
    parser.add_argument("--raw", action="store_true", help="sample with the raw weights instead of the EMA "
                        "(default: as the run's sample.use_ema says)")
    parser.add_argument("--sampler", help="ddpm/ddim/dpm_solver (ddpm objective) or euler/heun/euler_maruyama (flow)")
    parser.add_argument("--steps", type=positive_int, help="number of sampling steps")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only at normalised times in [LO, HI]")
    parser.add_argument("--guided-channels", type=int, help="guide only the first channels (3: reference DiT)")
    parser.add_argument("--routing-guidance", type=float, nargs=3, metavar=("LOW", "HIGH", "SCALE"),
                        help="TREAD routing guidance: forced routing ratios LOW < HIGH and the scale")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=positive_int, help="per rank")
    parser.add_argument("--vae", help="local copy of stabilityai/sd-vae-ft-ema (latent models)")
    args = parser.parse_args()
    if (args.classes is None) == (args.num_images is None):
        parser.error("give either --classes (a PNG grid of chosen classes) or --num-images (an .npz, or a PNG grid)")
    suffix = Path(args.out).suffix.lower()
    if args.classes is not None and suffix != ".png":
        parser.error(f"--classes draws a PNG grid: give --out a .png path, not {args.out!r} (an .npz of samples "
                     f"takes --num-images N)")
    if suffix not in (".png", ".npz"):
        parser.error(f"--out {args.out!r} must end in .png (a grid) or .npz (samples for tools/eval_fid.py)")
    grid = suffix == ".png"
    overrides = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                 "interval": tuple(args.interval) if args.interval else None, "guided_channels": args.guided_channels,
                 "routing_guidance": tuple(args.routing_guidance) if args.routing_guidance else None,
                 "seed": args.seed, "batch_size": args.batch_size, "vae": args.vae}
    from ssm_tread.sampling import sample_grid_file, sample_npz_file

    use_ema = False if args.raw else None  # None: the run's sample.use_ema

    if grid:
        path = sample_grid_file(args.checkpoint, args.out, args.classes, args.per_class, overrides, use_ema,
                                num_images=args.num_images, label_mode=args.labels)
        print(f"wrote {path}")
    else:
        sample_npz_file(args.checkpoint, args.out, args.num_images, args.labels, overrides, use_ema)


if __name__ == "__main__":
    run_tool(main, interrupted="finished chunks of an .npz are kept; run the same command again to continue",
             expected=(FileNotFoundError, ValueError))
