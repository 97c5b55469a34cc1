"""Scan-order pictures: the locality measure, the plotted restricted paths, and the CLI's files."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssm_tread import viz
from ssm_tread.scans import layer_scans, scan_order

TOOL = Path(__file__).resolve().parents[1] / "tools" / "visualize_scans.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("visualize_scans", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_step_distance_by_hand():
    # raster on 4x4: 12 steps along rows (1 each) and 3 row wraps (3 left + 1 down = 4 each): 24 / 15.
    assert viz.mean_step_distance(scan_order("raster", 4, 4), 4) == pytest.approx(24 / 15)
    assert viz.mean_step_distance(scan_order("column", 4, 4), 4) == pytest.approx(24 / 15)
    # (0,0) -> (1,1) -> (3,3): 2 and 4.
    assert viz.mean_step_distance([0, 5, 15], 4) == pytest.approx(3.0)
    # on a 2-wide grid, 0 -> 1 -> 2 is (0,0) -> (0,1) -> (1,0): 1 and 2.
    assert viz.mean_step_distance(torch.tensor([0, 1, 2]), 2) == pytest.approx(1.5)
    assert math.isnan(viz.mean_step_distance([7], 4))


@pytest.mark.parametrize("name", ["zigzag0", "zigzag3", "zigzag6", "hilbert"])
def test_neighbour_paths_have_unit_steps(name):
    assert viz.mean_step_distance(scan_order(name, 6, 6), 6) == 1.0


def test_keep_subset_is_a_seeded_route_draw():
    keep = viz.keep_subset(5, 7, ratio=0.3, seed=3)
    assert keep.numel() == 35 - math.floor(35 * 0.3)
    assert len(set(keep.tolist())) == keep.numel() and 0 <= keep.min() and keep.max() < 35
    assert torch.equal(keep, viz.keep_subset(5, 7, ratio=0.3, seed=3))
    assert not torch.equal(keep, viz.keep_subset(5, 7, ratio=0.3, seed=4))
    with pytest.raises(ValueError, match="ratio"):
        viz.keep_subset(4, 4, ratio=1.0)


@pytest.mark.parametrize("kind, depth", [("zigma", 10), ("dim", 9), ("fixed", 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_paths_are_the_layer_scans_filtered_to_the_kept_set(kind, depth, seed):
    height, width = 5, 7
    keep = viz.keep_subset(height, width, ratio=0.5, seed=seed)
    kept = set(keep.tolist())
    paths = viz.layer_paths(kind, depth, keep, height, width)
    assert [(layer, name) for layer, name, _ in paths] == list(enumerate(layer_scans(kind, depth)))
    for _, name, path in paths:
        assert path.tolist() == [i for i in scan_order(name, height, width).tolist() if i in kept]


def test_layer_paths_chosen_layers_and_errors():
    keep = viz.keep_subset(4, 4)
    assert [layer for layer, _, _ in viz.layer_paths("zigma", 8, keep, 4, 4, layers=[5, 2])] == [5, 2]
    with pytest.raises(ValueError, match="outside 0..7"):
        viz.layer_paths("zigma", 8, keep, 4, 4, layers=[8])
    with pytest.raises(ValueError, match="unknown kind of layer scans"):
        viz.layer_paths("spiral", 8, keep, 4, 4)


def test_restricted_titles_carry_both_localities():
    keep = viz.keep_subset(4, 4, seed=1)
    fig = viz.plot_restricted("zigma", 2, keep, 4, 4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    naive = viz.mean_step_distance(keep, 4)
    for title, (_, _, path) in zip(titles, viz.layer_paths("zigma", 2, keep, 4, 4)):
        assert f"d = {viz.mean_step_distance(path, 4):.2f}  (naive {naive:.2f})" in title
    assert titles[-1].startswith("naive")


def test_tool_writes_the_figures(tmp_path, capsys):
    written = load_tool().main(["--out", str(tmp_path / "figs"), "--grid", "4", "4", "--gif"])
    names = ["scan_orders.png", "restricted_zigma.png", "restricted_dim.png", "scan.gif"]
    assert [path.name for path in written] == names
    assert capsys.readouterr().out.split() == [str(tmp_path / "figs" / name) for name in names]
    for path in written:
        assert 5_000 < path.stat().st_size < 500_000
        with Image.open(path) as image:
            assert image.format == ("GIF" if path.suffix == ".gif" else "PNG")
            assert 300 <= image.width <= 3000 and 200 <= image.height <= 3000
    with Image.open(tmp_path / "figs" / "scan.gif") as gif:
        assert gif.n_frames > 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scans", "spiral"], "unknown kind of layer scans 'spiral'"),
        (["--scans", "fixed", "--fixed-order", "spiral"], "unknown scan order 'spiral'"),
        (["--gif", "--gif-order", "spiral"], "unknown scan order 'spiral'"),
        (["--scans", "dim", "--depth", "8"], "odd depth"),
        (["--layers", "9"], "outside 0..7"),
        (["--ratio", "1.0"], "ratio"),
        (["--grid", "0", "4"], "grid"),
    ],
)
def test_tool_rejects_bad_arguments(tmp_path, capsys, argv, message):
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(["--out", str(out), "--grid", "4", "4", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
