"""Scan orders over a grid of image tokens, and which order each layer of the SSM backbones reads (its scans).

A scan order is a permutation ``perm`` of the ``height * width`` grid tokens: ``perm[k]`` is the
raster index (``row * width + col``) of the k-th token the scan visits. A state-space layer reads
its tokens in that order and writes its output back to raster order with the inverse permutation.

Names:
    raster, raster_rev        row-major (DiM's H+) and its reverse (H-)
    column, column_rev        column-major (DiM's V+) and its reverse (V-)
    zigzag0 ... zigzag7       ZigMa's eight snake paths, for every start corner a row-snake then a
                              column-snake (corners: top-left, top-right, bottom-left, bottom-right)
    hilbert                   a generalised Hilbert curve for any height x width
"""

from __future__ import annotations

import torch

ZIGZAG_PATHS = 8
SCAN_NAMES = (
    "raster",
    "raster_rev",
    "column",
    "column_rev",
    *(f"zigzag{i}" for i in range(ZIGZAG_PATHS)),
    "hilbert",
)
# DiM's four directions, in the order its blocks cycle them after the first block.
DIM_CYCLE = ("raster_rev", "column", "column_rev", "raster")


def _check_size(height: int, width: int) -> None:
    for label, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"scan grid {label} must be a positive integer, got {value!r}")


def _snake(height: int, width: int, corner: int, by_column: bool) -> list[int]:
    """One of ZigMa's snake paths. corner: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    r0 = 0 if corner in (0, 1) else height - 1
    c0 = 0 if corner in (0, 2) else width - 1
    dr = 1 if r0 == 0 else -1
    dc = 1 if c0 == 0 else -1
    path = []
    if not by_column:
        for i in range(height):
            for j in range(width):
                col = j if i % 2 == 0 else width - 1 - j
                path.append((r0 + dr * i) * width + (c0 + dc * col))
    else:
        for j in range(width):
            for i in range(height):
                row = i if j % 2 == 0 else height - 1 - i
                path.append((r0 + dr * row) * width + (c0 + dc * j))
    return path


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert(x: int, y: int, ax: int, ay: int, bx: int, by: int, out: list[tuple[int, int]]) -> None:
    """Fill the rectangle spanned by the major axis (ax, ay) and minor axis (bx, by) from (x, y).

    The generalised Hilbert ("gilbert") recursion: halve the major axis when the rectangle is long,
    otherwise split it into the classic three parts. Odd half-lengths are bumped to even so that the
    sub-curves join through grid neighbours.
    """
    w, h = abs(ax + ay), abs(bx + by)
    dax, day, dbx, dby = _sign(ax), _sign(ay), _sign(bx), _sign(by)
    if h == 1:
        out.extend((x + i * dax, y + i * day) for i in range(w))
        return
    if w == 1:
        out.extend((x + i * dbx, y + i * dby) for i in range(h))
        return
    ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
    w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
    if 2 * w > 3 * h:
        if w2 % 2 and w > 2:
            ax2, ay2 = ax2 + dax, ay2 + day
        _gilbert(x, y, ax2, ay2, bx, by, out)
        _gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by, out)
    else:
        if h2 % 2 and h > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        _gilbert(x, y, bx2, by2, ax2, ay2, out)
        _gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2, out)
        _gilbert(
            x + (ax - dax) + (bx2 - dbx),
            y + (ay - day) + (by2 - dby),
            -bx2, -by2, -(ax - ax2), -(ay - ay2), out,
        )


def _hilbert(height: int, width: int) -> list[int]:
    # A neighbour-only path from (0, 0) to the far end of its major axis needs that axis to have even
    # length whenever the grid has an even number of cells (the two ends of a Hamiltonian path on a
    # bipartite grid differ in colour). So run along the width unless only the height fits that rule.
    if width % 2 == height % 2:
        along_width = width >= height
    else:
        along_width = width % 2 == 0
    cells: list[tuple[int, int]] = []  # (col, row)
    if along_width:
        _gilbert(0, 0, width, 0, 0, height, cells)
    else:
        _gilbert(0, 0, 0, height, width, 0, cells)
    return [row * width + col for col, row in cells]


def scan_order(name: str, height: int, width: int) -> torch.Tensor:
    """The scan order ``name`` over a ``height x width`` grid: LongTensor[height * width] of raster indices."""
    _check_size(height, width)
    n = height * width
    if name == "raster":
        path = torch.arange(n)
    elif name == "raster_rev":
        path = torch.arange(n).flip(0)
    elif name == "column":
        path = torch.arange(n).view(height, width).t().reshape(-1)
    elif name == "column_rev":
        path = torch.arange(n).view(height, width).t().reshape(-1).flip(0)
    elif name.startswith("zigzag") and name[6:].isdigit() and int(name[6:]) < ZIGZAG_PATHS:
        index = int(name[6:])
        path = torch.tensor(_snake(height, width, corner=index // 2, by_column=index % 2 == 1))
    elif name == "hilbert":
        path = torch.tensor(_hilbert(height, width))
    else:
        raise ValueError(f"unknown scan order {name!r}; valid names: {', '.join(SCAN_NAMES)}")
    return path.long()


def inverse_order(perm: torch.Tensor) -> torch.Tensor:
    """rank[perm[k]] = k: the step at which each raster index is visited."""
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel(), device=perm.device)
    return rank


def zigma_scans(depth: int, num_paths: int = ZIGZAG_PATHS) -> list[str]:
    """ZigMa: layer i reads zigzag path i mod num_paths."""
    if not 1 <= num_paths <= ZIGZAG_PATHS:
        raise ValueError(f"num_paths must be in 1..{ZIGZAG_PATHS}, got {num_paths}")
    return [f"zigzag{i % num_paths}" for i in range(depth)]


def dim_scans(depth: int) -> list[str]:
    """DiM's mirrored four-direction scans for an odd depth (49 in the paper).

    Block 0 reads raster; blocks 1..depth//2 cycle raster_rev, column, column_rev, raster; the decoder
    half mirrors the encoder (block depth-1-k uses block k's order). This is the official DiM's rule
    (github.com/tyshiwo1/DiM-DiffusionMamba, ``mamba_2d.py``).
    """
    if depth < 1 or depth % 2 == 0:
        raise ValueError(f"DiM's scans need an odd depth (encoder, middle block, decoder), got {depth}")
    middle = depth // 2
    encoder = ["raster"] + [DIM_CYCLE[(i - 1) % 4] for i in range(1, middle + 1)]
    return encoder + [encoder[depth - 1 - i] for i in range(middle + 1, depth)]


def fixed_scans(depth: int, name: str = "raster") -> list[str]:
    """Every layer reads the same order."""
    if name not in SCAN_NAMES:
        raise ValueError(f"unknown scan order {name!r}; valid names: {', '.join(SCAN_NAMES)}")
    return [name] * depth


LAYER_SCANS = {"zigma": zigma_scans, "dim": dim_scans, "fixed": fixed_scans}


def layer_scans(kind: str, depth: int, **kwargs) -> list[str]:
    """The scan order name of every layer of a ``kind`` of backbone: 'zigma', 'dim' or 'fixed'."""
    if kind not in LAYER_SCANS:
        raise ValueError(f"unknown kind of layer scans {kind!r}; valid kinds: {', '.join(LAYER_SCANS)}")
    return LAYER_SCANS[kind](depth, **kwargs)
