"""Draw the scan orders and the restricted paths that scan-consistent TREAD routing reads.

    python tools/visualize_scans.py --out docs/figures --gif
    python tools/visualize_scans.py --out docs/figures/grid32 --grid 32 32 --scans zigma dim dim_padded \
        --layers 0 1 2 3   # ImageNet-512's 32x32 patch grid (64x64 latents, patch 2)

Writes scan_orders.png, restricted_<kind>.png for each --scans kind and, with --gif, scan.gif;
prints the paths written. The kind ``dim_padded`` draws DiM's layers on its padded grid, as the model
reads them: 3 padding columns after every row and 3 padding rows below, every padding token kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ssm_tread import viz  # noqa: E402

# DiM's scans mirror its encoder around a middle block, so it needs an odd depth.
DEFAULT_DEPTH = {"dim": 9, "dim_padded": 9}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the figures (created if missing)")
    parser.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"), help="grid size (default 8 8)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of tokens that bypass the route (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kept-token draw (default 0)")
    parser.add_argument(
        "--scans", nargs="+", default=["zigma", "dim"],
        help="whose layer scans to draw: zigma, dim, dim_padded (DiM's padded grid) and/or fixed (default: zigma dim)",
    )
    parser.add_argument("--depth", type=int, help="layers of each (default 8; 9 for dim)")
    parser.add_argument("--layers", type=int, nargs="+", help="which layers to draw, from 0 (default: all)")
    parser.add_argument("--fixed-order", default="raster", help="the order of every layer for --scans fixed")
    parser.add_argument("--gif", action="store_true", help="also write scan.gif, a scan visiting the tokens")
    parser.add_argument("--gif-order", default="zigzag0", help="the scan order of the GIF (default zigzag0)")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    height, width = args.grid
    try:
        keep = viz.keep_subset(height, width, args.ratio, args.seed)
        outputs = {"scan_orders.png": viz.plot_scan_orders(height, width)}
        for kind in args.scans:
            depth = args.depth if args.depth is not None else DEFAULT_DEPTH.get(kind, 8)
            kwargs = {"name": args.fixed_order} if kind == "fixed" else {}
            if kind == "dim_padded":
                pad = viz.NUM_PAD
                padded = viz.padded_keep(keep, height, width, pad)
                figure = viz.plot_restricted("dim", depth, padded, height + pad, width + pad, args.layers)
            else:
                figure = viz.plot_restricted(kind, depth, keep, height, width, args.layers, **kwargs)
            outputs[f"restricted_{kind}.png"] = figure
        if args.gif:
            outputs["scan.gif"] = viz.scan_animation(args.gif_order, keep, height, width)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    written = [viz.save(item, args.out / name) for name, item in outputs.items()]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
