"""Scan orders against hand-written paths, the classic Hilbert curve and the papers' layer scans."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssm_tread.scans import SCAN_NAMES, dim_scans, layer_scans, scan_order, zigma_scans


def neighbour_steps(path, width):
    rows, cols = path // width, path % width
    return rows.diff().abs() + cols.diff().abs()


@given(height=st.integers(1, 40), width=st.integers(1, 40), name=st.sampled_from(SCAN_NAMES))
@settings(max_examples=300, deadline=None)
def test_every_order_is_a_permutation(height, width, name):
    path = scan_order(name, height, width)
    assert path.dtype == torch.long and path.shape == (height * width,)
    assert sorted(path.tolist()) == list(range(height * width))


@pytest.mark.parametrize("name", [n for n in SCAN_NAMES if n.startswith(("zigzag", "hilbert"))])
def test_zigzag_and_hilbert_move_between_grid_neighbours(name):
    for height in range(1, 25):
        for width in range(1, 25):
            if height * width > 1:
                assert (neighbour_steps(scan_order(name, height, width), width) == 1).all(), (name, height, width)


# A 2 x 3 grid, raster indices:  0 1 2
#                                3 4 5
HAND_WRITTEN_2X3 = {
    "raster": [0, 1, 2, 3, 4, 5],
    "raster_rev": [5, 4, 3, 2, 1, 0],
    "column": [0, 3, 1, 4, 2, 5],
    "column_rev": [5, 2, 4, 1, 3, 0],
    # ZigMa: per start corner (top-left, top-right, bottom-left, bottom-right) a row-snake then a column-snake.
    "zigzag0": [0, 1, 2, 5, 4, 3],
    "zigzag1": [0, 3, 4, 1, 2, 5],
    "zigzag2": [2, 1, 0, 3, 4, 5],
    "zigzag3": [2, 5, 4, 1, 0, 3],
    "zigzag4": [3, 4, 5, 2, 1, 0],
    "zigzag5": [3, 0, 1, 4, 5, 2],
    "zigzag6": [5, 4, 3, 0, 1, 2],
    "zigzag7": [5, 2, 1, 4, 3, 0],
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN_2X3))
def test_orders_on_a_rectangle_match_hand_written_paths(name):
    assert scan_order(name, 2, 3).tolist() == HAND_WRITTEN_2X3[name]


def test_zigzag_on_square_matches_zigma_definition():
    # 3 x 3:  0 1 2 / 3 4 5 / 6 7 8
    assert scan_order("zigzag0", 3, 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert scan_order("zigzag1", 3, 3).tolist() == [0, 3, 6, 7, 4, 1, 2, 5, 8]
    assert scan_order("zigzag7", 3, 3).tolist() == [8, 5, 2, 1, 4, 7, 6, 3, 0]


def classic_hilbert(order):
    """The textbook d -> (x, y) Hilbert mapping on a 2^k x 2^k grid."""
    n = 2**order
    points = []
    for d in range(n * n):
        x = y = 0
        t = d
        s = 1
        while s < n:
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x += s * rx
            y += s * ry
            t //= 4
            s *= 2
        points.append((x, y))
    return points


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_hilbert_on_power_of_two_squares_is_the_classic_curve(order):
    n = 2**order
    path = scan_order("hilbert", n, n)
    visited = [(int(p) % n, int(p) // n) for p in path]  # (x, y) = (col, row); both run (0, 0) -> (n-1, 0)
    assert visited == classic_hilbert(order)


def test_hilbert_keeps_locality_on_awkward_rectangles():
    # Every 4 consecutive steps stay within a small window (unlike raster's row jumps).
    for height, width in [(5, 7), (16, 9), (3, 20), (13, 13)]:
        path = scan_order("hilbert", height, width)
        rows, cols = path // width, path % width
        span = (rows[4:] - rows[:-4]).abs() + (cols[4:] - cols[:-4]).abs()
        assert span.max() <= 4


def test_bad_names_and_sizes_raise_with_the_choices():
    with pytest.raises(ValueError, match="valid names: raster"):
        scan_order("spiral", 4, 4)
    with pytest.raises(ValueError, match="valid names"):
        scan_order("zigzag8", 4, 4)
    for height, width in [(0, 4), (4, -1), (2.0, 2)]:
        with pytest.raises(ValueError, match="positive integer"):
            scan_order("raster", height, width)
    with pytest.raises(ValueError, match="valid kinds: zigma, dim, fixed"):
        layer_scans("snake", 4)


def test_dim_scans_follow_the_paper():
    names = dim_scans(49)
    assert len(names) == 49
    assert names[0] == "raster" and names[48] == "raster"
    cycle = ["raster_rev", "column", "column_rev", "raster"]
    assert names[1:25] == [cycle[(i - 1) % 4] for i in range(1, 25)]
    for k in range(24):  # the decoder mirrors the encoder: a skip and its fusing block share an order
        assert names[48 - k] == names[k]
    with pytest.raises(ValueError, match="odd depth"):
        dim_scans(48)


def test_zigma_scans_cycle_paths():
    assert zigma_scans(10) == [f"zigzag{i % 8}" for i in range(10)]
    assert zigma_scans(5, num_paths=2) == ["zigzag0", "zigzag1", "zigzag0", "zigzag1", "zigzag0"]
    assert layer_scans("fixed", 3, name="hilbert") == ["hilbert"] * 3
    with pytest.raises(ValueError, match="num_paths"):
        zigma_scans(4, num_paths=9)
