"""tools/bench/scan_gaps.py against closed forms and a loop over each sample's kept tokens."""
from __future__ import annotations

import pytest
import torch

from helpers import ROOT

from ssm_tread.models import create_model
from ssm_tread.scans import scan_order
from ssm_tread.train.config import load_config
from tools.bench.scan_gaps import read_orders, scan_gaps


class Digits:  # the geometry model_spec reads: 16x16 images, patch 2 -> an 8x8 token grid
    image_size, channels, num_classes = 16, 1, 10


@pytest.fixture(scope="module")
def rows():
    cfg = load_config(ROOT / "configs" / "study_digits_1500.py")
    return {(r["backbone"], r["mode"]): r for r in scan_gaps(cfg, Digits(), samples=1024)}


def test_without_routing_scans_step_to_grid_neighbours_except_at_raster_row_ends(rows):
    n = 8
    zigma, dim = rows["ZigMa", "none"], rows["DiM", "none"]
    assert (zigma["mean_distance"], zigma["neighbour_share"], zigma["fixed_share"]) == (1.0, 1.0, 0.0)
    # raster and column scans: n - 1 wraps of distance n among n*n - 1 steps -> 2n / (n + 1)
    assert dim["mean_distance"] == pytest.approx(2 * n / (n + 1), abs=1e-12)
    assert dim["neighbour_share"] == pytest.approx(n * (n - 1) / (n * n - 1), abs=1e-12)
    padded = (n + 3) ** 2  # DiM's 5 prefix tokens and its grid padded by 3 rows and 3 columns
    assert dim["fixed_share"] == pytest.approx((5 + padded - n * n) / (5 + padded), abs=1e-12)


def test_naive_order_reads_random_pairs_and_scan_consistent_keeps_the_layer_order(rows):
    n, kept = 8, 32
    for backbone in ("ZigMa", "DiM"):
        naive = rows[backbone, "naive"]
        # two distinct uniform cells of an n x n grid lie 2n/3 apart on average (Manhattan); 1024 x 31 pairs
        # give a standard error of about 0.015
        assert naive["mean_distance"] == pytest.approx(2 * n / 3, abs=0.1)
        assert naive["distinct_orders"] == 1
        assert rows[backbone, "scan"]["distinct_orders"] == rows[backbone, "none"]["distinct_orders"] > 1
    fixed = 5 + (n + 3) ** 2 - n * n
    assert rows["DiM", "scan"]["fixed_share"] == pytest.approx(fixed / (fixed + kept), abs=1e-12)


def test_scan_consistent_reads_are_the_layer_order_restricted_to_each_samples_kept_tokens():
    model = create_model("ZigMa", input_size=16, in_channels=3, num_classes=10, hidden_size=16, depth=5, patch_size=2,
                         routes=[(1, 3, 0.5)])
    reads = read_orders(model, batch=3, generator=torch.Generator().manual_seed(0))
    for block in (1, 2, 3):
        path = scan_order(model.scans[block], 8, 8).tolist()
        for sample in reads[block].tolist():
            assert len(sample) == 32 and len(set(sample)) == 32
            kept = set(sample)
            assert sample == [cell for cell in path if cell in kept]  # the path, skipping the routed-away cells
    for block in (0, 4):  # outside the route: the whole path
        assert reads[block].tolist() == [scan_order(model.scans[block], 8, 8).tolist()] * 3
