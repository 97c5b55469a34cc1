"""Pictures of scan orders and of the restricted paths that scan-consistent routing reads.

A token with raster index ``i`` is drawn at column ``i % width`` and row ``i // width``, row 0 at the
top like the image. A path is a sequence of raster indices: a full scan order (``scan_order``), a
layer's order restricted to the kept tokens of a route (``restrict_order``), or the kept tokens in
their random selection order (the naive baseline). Paths are drawn as arrows between consecutive
tokens, coloured by step.

Figures are built on matplotlib's Agg canvas without pyplot, so nothing here touches global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.animation import PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ssm_tread.models.dim import NUM_PAD
from ssm_tread.routing import Route, restrict_order, select_tokens
from ssm_tread.scans import SCAN_NAMES, inverse_order, layer_scans, scan_order

DIM_LABELS = {"raster": "H+", "raster_rev": "H-", "column": "V+", "column_rev": "V-"}
# plasma without its palest yellow, so the last steps stay visible on white.
CMAP = ListedColormap(matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, 256)))
PANEL_INCHES = 2.5
MAX_COLUMNS = 5
MIN_FIGURE_WIDTH = 6.0  # inches: room for the titles
DPI = 120
DOT_SIZE = 10
ARROW_GAP = 0.15  # grid units
ARROW_WIDTH = 0.06  # grid units
GIF_FPS = 6
GIF_DPI = 80
GIF_HOLD_FRAMES = 6
BYPASSED = "#d0d0d0"


def mean_step_distance(path: Sequence[int] | torch.Tensor, width: int) -> float:
    """Mean grid (Manhattan) distance between consecutive tokens of ``path`` on a grid ``width`` wide.

    1.0 for a path that only steps to grid neighbours; nan for a path of fewer than two tokens.
    """
    path = torch.as_tensor(path)
    rows, cols = path // width, path % width
    return (rows.diff().abs() + cols.diff().abs()).float().mean().item()


def keep_subset(height: int, width: int, ratio: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A seeded kept set drawn as a TREAD route draws it: LongTensor[K] of raster indices in selection
    order, K = N - floor(N * ratio) of the N = height * width tokens."""
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio is the share of tokens that bypass the route, needs 0 <= ratio < 1, got {ratio}")
    n = height * width
    generator = torch.Generator().manual_seed(seed)
    return select_tokens(1, n, Route(0, 0, ratio).num_kept(n), torch.device("cpu"), generator)[0]


def padded_keep(keep: torch.Tensor, height: int, width: int, pad: int = NUM_PAD) -> torch.Tensor:
    """The tokens a DiM layer reads on its padded grid, (height + pad) x (width + pad) with ``pad`` padding
    columns after every row and ``pad`` padding rows below: the kept image tokens ``keep`` (raster indices of
    the height x width grid, in selection order) at their cells, then every padding cell, which no route
    bypasses. LongTensor[K + padding cells] of raster indices of the padded grid."""
    padded_width = width + pad
    cells = torch.arange((height + pad) * padded_width)
    is_pad = (cells // padded_width >= height) | (cells % padded_width >= width)
    return torch.cat([keep // width * padded_width + keep % width, cells[is_pad]])


def restricted_path(name: str, keep: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The kept tokens in the order scan ``name`` visits them: what a scan-consistent layer reads."""
    return restrict_order(scan_order(name, height, width), keep.unsqueeze(0))[0]


def layer_paths(
    kind: str,
    depth: int,
    keep: torch.Tensor,
    height: int,
    width: int,
    layers: Iterable[int] | None = None,
    **scan_kwargs,
) -> list[tuple[int, str, torch.Tensor]]:
    """(layer, scan order name, restricted path) for each chosen layer of ``layer_scans(kind, depth)``."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    scans = layer_scans(kind, depth, **scan_kwargs)
    layers = list(range(depth) if layers is None else layers)
    outside = [i for i in layers if not 0 <= i < depth]
    if outside:
        raise ValueError(f"layers {outside} outside 0..{depth - 1} (depth {depth}, layers are numbered from 0)")
    return [(i, scans[i], restricted_path(scans[i], keep, height, width)) for i in layers]


def order_label(name: str) -> str:
    """The order's name with DiM's direction or ZigMa's path index where one applies."""
    if name in DIM_LABELS:
        return f"{name} (DiM {DIM_LABELS[name]})"
    if name.startswith("zigzag"):
        return f"{name} (ZigMa path {name[6:]})"
    return name


def _figure(panels: int) -> tuple[Figure, list]:
    columns = min(panels, MAX_COLUMNS)
    rows = -(-panels // columns)
    size = (max(columns * PANEL_INCHES + 0.8, MIN_FIGURE_WIDTH), rows * PANEL_INCHES + 1.1)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_axis_off()
    return fig, axes[:panels]


def _grid_axes(ax, height: int, width: int) -> None:
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(height - 0.4, -0.6)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#999999")


def _bypassed(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    mask = torch.ones(num_tokens, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


def _draw_path(
    ax,
    path: torch.Tensor,
    height: int,
    width: int,
    norm: Normalize,
    bypassed: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
):
    """Draw ``path`` on a grid, token k and the arrow leaving it coloured by ``steps[k]`` (default k),
    ``bypassed`` tokens greyed out. Returns (arrows, token dots, start marker, end marker)."""
    _grid_axes(ax, height, width)
    if bypassed is not None:
        ax.scatter(bypassed % width, bypassed // width, s=14, marker="x", color=BYPASSED, linewidths=1, zorder=1)
    x, y = (path % width).numpy(), (path // width).numpy()
    colours = CMAP(norm(np.arange(len(path)) if steps is None else steps.numpy()))
    # Arrows start and stop ARROW_GAP short of their tokens, so the dots stay visible.
    xy = np.stack([x, y], axis=1).astype(float)
    delta = np.diff(xy, axis=0)
    trim = ARROW_GAP * delta / np.linalg.norm(delta, axis=1, keepdims=True).clip(min=1e-9)
    tail, shaft = xy[:-1] + trim, delta - 2 * trim
    arrows = ax.quiver(
        tail[:, 0], tail[:, 1], shaft[:, 0], shaft[:, 1], color=colours[:-1], angles="xy", scale_units="xy",
        scale=1, width=ARROW_WIDTH / width, headwidth=4, headlength=4.5, headaxislength=4, zorder=2,
    )
    dots = ax.scatter(x, y, s=DOT_SIZE, c=colours, zorder=3)
    start = ax.scatter(x[:1], y[:1], s=60, marker="o", facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    end = ax.scatter(x[-1:], y[-1:], s=60, marker="s", facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    return arrows, dots, start, end


def _legend_and_colourbar(fig: Figure, axes: list, norm: Normalize, label: str, bypassed: bool) -> None:
    fig.colorbar(ScalarMappable(norm, CMAP), ax=axes, label=label, shrink=0.8, aspect=30)
    marker = dict(markersize=7, linestyle="none", markerfacecolor="none", color="black")
    handles = [Line2D([], [], marker="o", label="start", **marker), Line2D([], [], marker="s", label="end", **marker)]
    if bypassed:
        handles.append(Line2D([], [], marker="x", linestyle="none", color=BYPASSED, label="bypassed token"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def plot_scan_orders(height: int = 8, width: int = 8, names: Sequence[str] = SCAN_NAMES) -> Figure:
    """Every scan order in ``names`` as a path over a ``height x width`` grid, one panel each."""
    paths = [scan_order(name, height, width) for name in names]
    fig, axes = _figure(len(names))
    norm = Normalize(0, height * width - 1)
    for ax, name, path in zip(axes, names, paths):
        _draw_path(ax, path, height, width, norm)
        ax.set_title(f"{order_label(name)}\nd = {mean_step_distance(path, width):.2f}", fontsize=9)
    fig.suptitle(f"Scan orders, {height}x{width} token grid (d: mean grid distance per step)", fontsize=11)
    _legend_and_colourbar(fig, axes, norm, "scan step", bypassed=False)
    return fig


def plot_restricted(
    kind: str,
    depth: int,
    keep: torch.Tensor,
    height: int,
    width: int,
    layers: Iterable[int] | None = None,
    **scan_kwargs,
) -> Figure:
    """The restricted path each chosen layer of ``layer_scans(kind, depth)`` reads over the kept set ``keep``, and the
    naive selection order last, each titled with its locality d against the naive one's."""
    paths = layer_paths(kind, depth, keep, height, width, layers, **scan_kwargs)
    bypassed = _bypassed(keep, height * width)
    naive = mean_step_distance(keep, width)
    fig, axes = _figure(len(paths) + 1)
    norm = Normalize(0, max(len(keep) - 1, 1))
    for ax, (layer, name, path) in zip(axes, paths):
        _draw_path(ax, path, height, width, norm, bypassed)
        d = mean_step_distance(path, width)
        ax.set_title(f"layer {layer}: {order_label(name)}\nd = {d:.2f}  (naive {naive:.2f})", fontsize=9)
    _draw_path(axes[-1], keep, height, width, norm, bypassed)
    axes[-1].set_title(f"naive: random selection order\nd = {naive:.2f}", fontsize=9, color="firebrick")
    fig.suptitle(
        f"{kind} scans, depth {depth}\neach layer's scan order restricted to the {len(keep)} kept of"
        f" {height * width} tokens\nd: mean grid distance per step (scan-consistent vs naive)",
        fontsize=11,
    )
    _legend_and_colourbar(fig, axes, norm, "step among kept tokens", bypassed=True)
    return fig


@dataclass(frozen=True)
class ScanAnimation:
    """A figure and the function that draws its frame t, for t in range(frames)."""

    figure: Figure
    draw_frame: Callable[[int], None]
    frames: int

    def save(self, path: str | Path) -> None:
        writer = PillowWriter(fps=GIF_FPS)
        with writer.saving(self.figure, path, GIF_DPI):
            for t in range(self.frames):
                self.draw_frame(t)
                writer.grab_frame()


def scan_animation(name: str, keep: torch.Tensor, height: int, width: int) -> ScanAnimation:
    """Scan ``name`` visiting the tokens step by step: the full order beside its restriction to ``keep``.

    Frame t shows the first t + 1 steps of the full scan and, beside it, the kept tokens among them in
    the order the restricted scan reads them. Both are coloured by the full scan's step; the last frame
    is held for a moment.
    """
    n = height * width
    full = scan_order(name, height, width)
    restricted = restricted_path(name, keep, height, width)
    rank = inverse_order(full)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.set_title(f"full scan: {n} tokens", fontsize=9)
    right.set_title(f"restricted to {len(keep)} kept tokens", fontsize=9)
    norm = Normalize(0, n - 1)
    # Each panel's artists and, per full-scan step, how many of its tokens have been visited.
    panels = [
        (_draw_path(left, full, height, width, norm), torch.arange(1, n + 1)),
        (
            _draw_path(right, restricted, height, width, norm, _bypassed(keep, n), rank[restricted]),
            kept[full].cumsum(0),
        ),
    ]
    shafts = [(arrows.U.copy(), arrows.V.copy()) for (arrows, *_), _ in panels]
    for ax, path in ((left, full), (right, restricted)):  # tokens still to visit, in grey
        ax.scatter(path % width, path // width, s=DOT_SIZE, color=BYPASSED, zorder=1)
    title = fig.suptitle(f"{order_label(name)}: step {n} of {n}", fontsize=10)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # lay out once: the frames only show and hide artists

    def draw_frame(t: int) -> None:
        t = min(t, n - 1)
        title.set_text(f"{order_label(name)}: step {t + 1} of {n}")
        for ((arrows, dots, start, end), visited), (u, v) in zip(panels, shafts):
            shown = int(visited[t])  # tokens visited so far; the arrows between them are shown
            hidden = np.arange(arrows.N) + 1 >= shown
            arrows.set_UVC(np.ma.array(u, mask=hidden), np.ma.array(v, mask=hidden))
            dots.set_sizes([DOT_SIZE] * shown + [0] * (arrows.N + 1 - shown))
            start.set_visible(shown > 0)
            end.set_visible(shown == arrows.N + 1)

    return ScanAnimation(fig, draw_frame, n + GIF_HOLD_FRAMES)


def save(item: Figure | ScanAnimation, path: str | Path) -> Path:
    """Write a figure (PNG, ...) or a scan animation (GIF) to ``path``."""
    path = Path(path)
    if isinstance(item, ScanAnimation):
        item.save(path)
    else:
        item.savefig(path, dpi=DPI)
    return path
