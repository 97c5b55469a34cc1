"""What a scan-based layer reads inside a TREAD route, without training: how far apart on the token grid
consecutively read image tokens lie, how much of the read sequence is fixed (non-image) tokens, and how
many distinct orders the route's blocks read.

A selective scan carries information only along its read order, so the grid distance between consecutive
reads is the gap its state must bridge. Without routing every DiM and ZigMa scan steps to a grid
neighbour, except at a raster scan's row ends (a mean of 2w/(w+1) on a w-wide grid). Scan-consistent TREAD
reads each layer's order restricted to the kept tokens; naive-order TREAD reads the kept tokens in their
random selection order, the same in every block, so two consecutive reads are two distinct uniformly random
cells: a mean Manhattan distance of 2n/3 on an n x n grid.
"""
from __future__ import annotations

import torch

from ssm_tread.models import create_model
from ssm_tread.train.config import load_config, model_spec
from tools.bench.study import MODES, run_overrides

MODE_NAMES = {"none": "no routing", "scan": "TREAD, scan-consistent", "naive": "TREAD, naive order"}


def read_orders(model, batch: int, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Block index -> the sequence positions its scan reads, in reading order: LongTensor[batch, length]
    (the kept tokens and the fixed ones inside a route, the whole sequence elsewhere)."""
    length = model.scan_orders.shape[1]
    routing = model.router.begin(routable=getattr(model, "grid_positions", None), training=True)
    model.router.generator = generator
    positions = torch.arange(length).expand(batch, length).unsqueeze(-1)  # [B, L, 1]: each token's own position
    reads = {}
    for i in range(len(model.blocks)):
        positions = routing.enter(i, positions)
        index = routing.scan(model.scan_orders[model.block_scan[i]])
        reads[i] = index.apply(positions).squeeze(-1)
        positions = routing.exit(i, positions)
    return reads


def gap_statistics(reads: torch.Tensor, grid_positions: torch.Tensor, width: int) -> dict:
    """Of reading orders [B, K] over a sequence whose image token j (raster over a grid ``width`` wide) sits
    at position grid_positions[j]: the mean Manhattan grid distance between consecutively read image tokens
    (fixed tokens read between them skipped), the share of those steps that reach a grid neighbour, and the
    share of fixed tokens among all reads."""
    image_index = torch.full((int(reads.max()) + 1,), -1, dtype=torch.long)
    image_index[grid_positions] = torch.arange(len(grid_positions))
    j = image_index[reads]  # [B, K]: image token index, -1 for a fixed token
    is_image = j >= 0
    images = j[is_image].view(reads.shape[0], -1)  # every row holds the same number of image tokens
    row, col = images // width, images % width
    distance = (row.diff(dim=1).abs() + col.diff(dim=1).abs()).double()
    return {"mean_distance": distance.mean().item(), "neighbour_share": (distance == 1).double().mean().item(),
            "fixed_share": 1.0 - is_image.double().mean().item()}


def scan_gaps(cfg: dict, dataset, samples: int = 512, seed: int = 0) -> list[dict]:
    """One row per scan-based backbone of a study config and mode: the gap statistics of the blocks inside
    the study's route (for no routing: the same blocks reading the whole sequence), averaged over blocks."""
    study, rows = cfg["_study"], []
    for backbone in study["backbones"]:
        for mode in (m for m in MODES if m in study["modes"]):
            # the study's own run config for this backbone and mode (run_dir unused: nothing is trained)
            run = load_config(cfg["_path"], run_overrides(cfg, backbone, mode, seed, "runs"))
            name, kwargs = model_spec(run, dataset)
            model = create_model(name, **kwargs)
            if not hasattr(model, "scan_orders"):
                break  # attention reads no order
            grid = getattr(model, "grid_positions", torch.arange(model.scan_orders.shape[1]))
            reads = read_orders(model, samples, torch.Generator().manual_seed(seed))
            start, end = study["routes"][backbone][0][:2]
            blocks = [gap_statistics(reads[i], grid, model.grid_size[1]) for i in range(start, end + 1)]
            distinct = len({tuple(reads[i][0].tolist()) for i in range(start, end + 1)})
            rows.append({"backbone": backbone, "mode": mode, "blocks": f"{start}-{end}", "distinct_orders": distinct,
                         **{key: sum(b[key] for b in blocks) / len(blocks) for key in blocks[0]}})
    return rows


def gaps_table(rows: list[dict]) -> str:
    lines = ["| backbone | mode | blocks | grid distance between consecutive reads | reads that reach a grid "
             "neighbour | fixed tokens among the reads | distinct read orders |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {MODE_NAMES[r['mode']]} | {r['blocks']} | {r['mean_distance']:.2f} | "
                     f"{r['neighbour_share']:.0%} | {r['fixed_share']:.0%} | {r['distinct_orders']} |")
    return "\n".join(lines)
