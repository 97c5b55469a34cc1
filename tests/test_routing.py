"""The TREAD router against naive references: Python filters, closed-form gradients, exact identity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssm_tread.routing import (
    Route,
    ScanIndex,
    TokenRouter,
    parse_routes,
    restrict_order,
    scan_permutation,
    select_tokens,
)
from ssm_tread.scans import SCAN_NAMES, scan_order


def run_blocks(router, x, blocks, routable=None, training=True, orders=None):
    """The loop every backbone runs; ``blocks[i](x, scan)`` may use the layer's ScanIndex."""
    routing = router.begin(routable=routable, training=training)
    for i, block in enumerate(blocks):
        x = routing.enter(i, x)
        scan = routing.scan(orders[i]) if orders is not None else None
        x = block(x, scan)
        x = routing.exit(i, x)
    return x, routing


def scale_block(factor):
    return lambda x, scan: x * factor


def test_route_keeps_the_published_token_counts():
    assert Route(2, 8, 0.5).num_kept(256) == 128
    assert Route(2, 8, 0.75).num_kept(256) == 64
    assert Route(2, 8, 0.25).num_kept(10) == 8  # K = N - floor(N * r)
    assert Route(2, 8, 0.0).num_kept(7) == 7


@pytest.mark.parametrize(
    "routes, message",
    [
        ([(3, 2, 0.5)], "route 0 .*start <= end"),
        ([(0, 8, 0.5)], "end < depth = 8"),
        ([(-1, 2, 0.5)], "0 <= start"),
        ([(1, 2, 1.0)], "0 <= ratio < 1"),
        ([(1, 2, -0.1)], "0 <= ratio < 1"),
        ([(1, 4, 0.5), (4, 6, 0.5)], "overlap"),
        ([{"start": 1, "end": 2}], "missing \\['ratio'\\]"),
        ([{"start": 1, "end": 2, "ratio": 0.5, "rate": 1}], "unknown \\['rate'\\]"),
        ([(1, 2)], "3-tuple"),
    ],
)
def test_invalid_routes_say_which_and_why(routes, message):
    with pytest.raises(ValueError, match=message):
        parse_routes(routes, depth=8)


def test_routes_are_sorted_and_accept_every_spelling():
    routes = parse_routes([{"start": 5, "end": 6, "ratio": 0.25}, Route(0, 1, 0.5), (2, 3, 0.5)], depth=8)
    assert [r.start for r in routes] == [0, 2, 5]


def test_selection_is_a_per_sample_uniform_subset():
    gen = torch.Generator().manual_seed(0)
    keep = select_tokens(4000, 10, 4, torch.device("cpu"), gen)
    assert keep.shape == (4000, 4)
    assert all(len(set(row)) == 4 for row in keep.tolist())
    counts = torch.bincount(keep.flatten(), minlength=10).float()
    expected = 4000 * 4 / 10
    assert ((counts - expected).abs() / expected).max() < 0.06  # about 3 standard deviations (seeded)
    assert not torch.equal(keep[0], keep[1]) or not torch.equal(keep[1], keep[2])


def test_seeded_generator_repeats_the_selection():
    router = TokenRouter([(1, 2, 0.5)], depth=4)
    x = torch.randn(3, 16, 8)
    masks = []
    for _ in range(2):
        router.generator = torch.Generator().manual_seed(123)
        _, routing = run_blocks(router, x, [scale_block(2.0)] * 4)
        masks.append(routing.kept_masks()[0])
    assert torch.equal(masks[0], masks[1])
    router.generator = torch.Generator().manual_seed(124)
    _, routing = run_blocks(router, x, [scale_block(2.0)] * 4)
    assert not torch.equal(routing.kept_masks()[0], masks[0])


@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    batch=st.integers(1, 4),
    name=st.sampled_from(SCAN_NAMES),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_restrict_order_equals_a_naive_filter(height, width, batch, name, data):
    n = height * width
    order = scan_order(name, height, width)
    k = data.draw(st.integers(1, n))
    keep = torch.stack([torch.randperm(n)[:k] for _ in range(batch)])
    restricted = restrict_order(order, keep)
    for b in range(batch):
        kept = set(keep[b].tolist())
        assert restricted[b].tolist() == [p for p in order.tolist() if p in kept]
    assert torch.equal(keep.gather(1, scan_permutation(order, keep)), restricted)


def test_scan_index_round_trips_and_reads_in_restricted_order():
    order = scan_order("zigzag3", 4, 5)
    keep = torch.stack([torch.randperm(20)[:9] for _ in range(3)])
    x = keep.unsqueeze(-1).float().expand(-1, -1, 2)  # each token carries its own position
    scan = ScanIndex(scan_permutation(order, keep))
    read = scan.apply(x)
    assert torch.equal(read[..., 0].long(), restrict_order(order, keep))
    assert torch.equal(scan.restore(read), x)
    full = ScanIndex(order)
    positions = torch.arange(20).float().view(1, 20, 1)
    assert full.apply(positions).flatten().long().tolist() == order.tolist()
    assert torch.equal(full.restore(full.apply(positions)), positions)


def test_bypassed_tokens_come_back_bit_identical():
    router = TokenRouter([(1, 3, 0.5)], depth=5)
    x = torch.randn(4, 32, 6)
    noisy = lambda h, scan: h + torch.randn_like(h)  # noqa: E731
    identity = lambda h, scan: h  # noqa: E731
    out, routing = run_blocks(router, x, [identity, noisy, noisy, noisy, identity])
    kept = routing.kept_masks()[0]
    assert kept.sum(1).tolist() == [16] * 4
    assert torch.equal(out[~kept], x[~kept])
    assert not torch.equal(out[kept], x[kept])


def test_route_around_identity_blocks_returns_the_input_unchanged():
    router = TokenRouter([(0, 1, 0.5), (2, 4, 0.25)], depth=6)
    x = torch.randn(3, 50, 7)
    out, routing = run_blocks(router, x, [lambda h, scan: h] * 6)
    assert torch.equal(out, x)
    assert len(routing.kept_masks()) == 2


def test_gradients_follow_the_route_and_the_bypass():
    # Each block triples its tokens: kept tokens pass 3 routed blocks (d out / d in = 27), bypassed
    # tokens only the 2 blocks outside the route (9).
    router = TokenRouter([(1, 3, 0.5)], depth=5)
    x = torch.randn(2, 12, 3, requires_grad=True)
    out, routing = run_blocks(router, x, [scale_block(3.0)] * 5)
    out.sum().backward()
    kept = routing.kept_masks()[0].unsqueeze(-1).expand_as(x)
    assert torch.all(x.grad[kept] == 3.0**5)
    assert torch.all(x.grad[~kept] == 3.0**2)


def test_only_routable_positions_are_routed_and_fixed_ones_stay_in_place():
    router = TokenRouter([(0, 0, 0.75)], depth=1)
    routable = torch.arange(3, 19)  # 3 prefix tokens and 2 trailing tokens never routed
    seen = {}

    def record(h, scan):
        seen["x"] = h
        return h

    x = torch.arange(21).float().view(1, 21, 1).repeat(5, 1, 1)
    run_blocks(router, x, [record], routable=routable)
    assert seen["x"].shape == (5, 5 + 4, 1)  # 16 - floor(16 * 0.75) = 4 image tokens kept
    for row in seen["x"][..., 0].long().tolist():
        assert {0, 1, 2, 19, 20} <= set(row)
        assert set(row) - {0, 1, 2, 19, 20} <= set(range(3, 19))


def test_evaluation_mode_does_not_route_unless_forced():
    router = TokenRouter([(0, 1, 0.5)], depth=2)
    x = torch.randn(2, 16, 4)
    shapes = []
    block = lambda h, scan: shapes.append(h.shape[1]) or h  # noqa: E731
    run_blocks(router, x, [block, block], training=False)
    with router.forced():
        run_blocks(router, x, [block, block], training=False)
    with router.forced(ratio=0.25):
        run_blocks(router, x, [block, block], training=False)
    run_blocks(router, x, [block, block], training=False)
    assert shapes == [16, 16, 8, 8, 12, 12, 16, 16]
    with pytest.raises(ValueError, match="forced routing ratio"):
        with router.forced(ratio=1.5):
            pass


def test_scan_consistent_and_naive_orderings():
    order = scan_order("column", 4, 4)
    x = torch.arange(16).float().view(1, 16, 1).repeat(3, 1, 1)
    for consistent in (True, False):
        router = TokenRouter([(0, 0, 0.5)], depth=1, scan_consistent=consistent)
        seen = {}

        def record(h, scan):
            seen["read"] = scan.apply(h)[..., 0].long()
            return h

        _, routing = run_blocks(router, x, [record], orders=[order])
        selected = routing.finished[0].keep
        if consistent:
            assert torch.equal(seen["read"], restrict_order(order, selected))
        else:
            assert torch.equal(seen["read"], selected)  # survivors in random selection order


def test_align_brings_a_skip_across_a_route_boundary():
    router = TokenRouter([(1, 2, 0.5)], depth=4)
    x = torch.randn(2, 10, 3)
    routing = router.begin(training=True)
    h0 = routing.enter(0, x)
    tag0 = routing.tag()
    h1 = routing.enter(1, h0)  # route starts: kept tokens only
    tag1 = routing.tag()
    skip_inside = h1 * 5
    assert torch.equal(routing.align(h0, tag0), routing.current.gather(h0))  # full skip -> kept
    assert torch.equal(routing.align(skip_inside, tag1), skip_inside)
    h2 = routing.exit(2, h1 * 2)  # route ends
    full = routing.align(skip_inside, tag1)
    keep = routing.finished[0].keep
    expected = x.clone()
    for b in range(2):
        expected[b, keep[b]] = skip_inside[b]
    assert torch.equal(full, expected)
    assert h2.shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_router_on_cuda_matches_cpu_semantics():
    router = TokenRouter([(1, 2, 0.5)], depth=4)
    router.generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 64, 8, device="cuda", requires_grad=True)
    out, routing = run_blocks(router, x, [scale_block(3.0)] * 4)
    out.sum().backward()
    kept = routing.kept_masks()[0].unsqueeze(-1).expand_as(x)
    assert torch.all(x.grad[kept] == 81.0) and torch.all(x.grad[~kept] == 9.0)


def naive_restriction(order: torch.Tensor, keep: torch.Tensor) -> list[list[int]]:
    """Each sample's kept positions in the order ``order`` visits them, by a filter over the order."""
    return [[p for p in order.tolist() if p in set(row.tolist())] for row in keep]


def test_a_scan_read_follows_the_order_given_not_an_earlier_one_at_the_same_address():
    routing = TokenRouter([Route(0, 1, 0.5)], depth=2).begin(training=True)
    routing.enter(0, torch.randn(2, 16, 3))
    keep = routing.tag().keep
    order = torch.arange(16)
    assert keep.gather(1, routing.scan(order).to_scan).tolist() == naive_restriction(order, keep)
    order.copy_(order.flip(0))  # the same memory now holds another order
    assert keep.gather(1, routing.scan(order).to_scan).tolist() == naive_restriction(order, keep)
    for name in ("column", "zigzag5"):  # temporaries: each may land where a freed one was
        assert keep.gather(1, routing.scan(scan_order(name, 4, 4)).to_scan).tolist() == \
            naive_restriction(scan_order(name, 4, 4), keep)
    routing.exit(1, routing.tag().gather(torch.randn(2, 16, 3)))
    assert torch.equal(routing.scan(order).to_scan, order)  # after the route: the full order again
