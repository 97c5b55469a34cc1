"""Scan-consistent routing in the state-space backbones (DiM, ZigMa), checked against naive references.

A PROBE mixer stands in for Mamba and records the tokens it reads. With the blocks made the identity
(norm removed, zero modulation, zero probe output, DiM's skip fusion passing the stream through),
every token keeps its embedding row through the network (ZigMa's residual pair doubles it each block,
an exact scaling), so the probe's rows identify the tokens by matching their directions against the
sequence entering block 0.
"""

import pytest
import torch

import ssm_tread.routing as routing_module
from ssm_tread.models.dim import DiM
from ssm_tread.models.zigma import ZigMa
from ssm_tread.scans import dim_scans, scan_order, zigma_scans
from helpers import Probe, capture_passes, make_identity_blocks, model_inputs, randomize_zero_parameters

NUM_CLASSES = 10
INPUT = 16  # 16x16 input, patch 2: an 8x8 grid (64 image tokens)
GRID = 8


def build(family, routes=None, depth=None, scan_consistent=True, mixer_cls=None, hidden_size=16):
    common = dict(
        input_size=INPUT, patch_size=2, in_channels=4, hidden_size=hidden_size, num_classes=NUM_CLASSES,
        class_dropout_prob=0.0, routes=routes, scan_consistent=scan_consistent,
    )
    if mixer_cls is not None:
        common["mixer_cls"] = mixer_cls
    if family == "dim":
        return DiM(depth=depth or 7, **common)
    return ZigMa(depth=depth or 6, num_paths=8, **common)


def full_order(family, name):
    """A block's scan order over the whole sequence, built naively from ``scan_order``."""
    if family == "dim":
        padded = GRID + 3
        return list(range(5)) + [5 + i for i in scan_order(name, padded, padded).tolist()]
    return scan_order(name, GRID, GRID).tolist()


def scans(family, depth):
    return dim_scans(depth) if family == "dim" else zigma_scans(depth, 8)


def image_positions(family):
    """Sequence positions of the image grid tokens (the routable ones)."""
    if family == "dim":
        return {5 + r * (GRID + 3) + c for r in range(GRID) for c in range(GRID)}
    return set(range(GRID * GRID))


def same_rows(seen, reference):
    """Whether every row of ``seen`` [K, D] is a positive multiple of the same row of ``reference`` [K, D].

    (DiM's padding tokens repeat, so rows are compared in place rather than looked up.)"""
    cosine = (torch.nn.functional.normalize(seen, dim=-1) * torch.nn.functional.normalize(reference, dim=-1)).sum(-1)
    return bool((cosine > 1 - 1e-6).all())


def probe_run(family, routes, scan_consistent=True, depth=None):
    torch.manual_seed(0)
    model = build(family, routes=routes, depth=depth, scan_consistent=scan_consistent, mixer_cls=Probe)
    make_identity_blocks(model)
    model.train()
    passes = capture_passes(model)
    entering = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: entering.append(args[0].detach().clone()))
    with torch.no_grad():
        model(*model_inputs(3, INPUT))
    return model, passes[-1], entering[0][..., :16]  # ZigMa's blocks take the pair [h | r]; h holds the tokens


ROUTES = [(1, 4, 0.5)]


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_every_routed_layer_reads_the_survivors_in_its_own_restricted_order(family):
    model, routing, sequence = probe_run(family, ROUTES)
    (state,) = routing.finished
    names = scans(family, len(model.blocks))
    for i, block in enumerate(model.blocks):
        (seen,) = block.mixer.seen
        for b in range(seen.shape[0]):
            if 1 <= i <= 4:
                kept = set(state.keep[b].tolist())
                expected = [p for p in full_order(family, names[i]) if p in kept]
            else:
                expected = full_order(family, names[i])
            assert same_rows(seen[b], sequence[b, expected]), f"block {i} ({names[i]}), sample {b}"


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_naive_mode_does_not_keep_the_scan_orders(family):
    model, routing, sequence = probe_run(family, ROUTES, scan_consistent=False)
    (state,) = routing.finished
    names = scans(family, len(model.blocks))
    for i in range(1, 5):
        (seen,) = model.blocks[i].mixer.seen
        for b in range(seen.shape[0]):
            kept = set(state.keep[b].tolist())
            assert same_rows(seen[b], sequence[b, state.keep[b]])  # the random selection order
            assert not same_rows(seen[b], sequence[b, [p for p in full_order(family, names[i]) if p in kept]])


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_kept_set_matches_the_returned_masks_and_ratio(family):
    torch.manual_seed(0)
    model = build(family, routes=[(1, 3, 0.25)])
    passes = capture_passes(model)
    with torch.no_grad():
        _, masks = model(*model_inputs(3, INPUT), return_masks=True)
    assert masks.shape == (1, 3, INPUT, INPUT) and masks.dtype == torch.bool
    (state,) = passes[-1].finished
    grid = sorted(image_positions(family))
    for b in range(3):
        kept = set(state.keep[b].tolist())
        token_mask = torch.tensor([p in kept for p in grid]).view(GRID, GRID)
        assert torch.equal(masks[0, b], token_mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
        assert token_mask.sum() == 64 - int(64 * 0.25)


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_ratio_zero_route_equals_the_unrouted_model_in_training(family):
    torch.manual_seed(0)
    plain = build(family)
    randomize_zero_parameters(plain)
    routed = build(family, routes=[(1, 4, 0.0)])
    routed.load_state_dict(plain.state_dict())
    plain.train(), routed.train()
    x, t, y = model_inputs(3, INPUT)
    with torch.no_grad():
        out, masks = routed(x, t, y, return_masks=True)
        torch.testing.assert_close(out, plain(x, t, y), rtol=1e-5, atol=1e-6)
    assert masks.shape[0] == 1 and masks.all()


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_routing_changes_training_outputs_and_not_evaluation_outputs(family):
    torch.manual_seed(0)
    plain = build(family)
    randomize_zero_parameters(plain)
    routed = build(family, routes=[(1, 4, 0.5)])
    routed.load_state_dict(plain.state_dict())
    x, t, y = model_inputs(3, INPUT)
    with torch.no_grad():
        plain.train(), routed.train()
        assert not torch.allclose(routed(x, t, y), plain(x, t, y), atol=1e-4)
        plain.eval(), routed.eval()
        out, masks = routed(x, t, y, return_masks=True)
        torch.testing.assert_close(out, plain(x, t, y), rtol=0, atol=0)
        assert masks.shape == (0, 3, INPUT, INPUT)
        with routed.router.forced():
            _, forced_masks = routed(x, t, y, return_masks=True)
        assert forced_masks.shape == (1, 3, INPUT, INPUT)


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_bypassed_tokens_reenter_unchanged(family):
    """Tokens entering block end+1 at bypassed positions equal those leaving block start-1 (for ZigMa
    both halves of the residual pair [h | r])."""
    start, end = 2, 4
    torch.manual_seed(0)
    model = build(family, routes=[(start, end, 0.5)])
    randomize_zero_parameters(model)
    model.train()
    passes = capture_passes(model)
    leaving, entering = [], []
    model.blocks[start - 1].register_forward_hook(lambda module, args, out: leaving.append(out.detach().clone()))
    model.blocks[end + 1].register_forward_pre_hook(lambda module, args: entering.append(args[0].detach().clone()))
    with torch.no_grad():
        model(*model_inputs(3, INPUT))
    (state,) = passes[-1].finished
    (before,), (after,) = leaving, entering
    assert before.shape == after.shape == ((3, model.seq_len, 16) if family == "dim" else (3, 64, 32))
    for b in range(3):
        kept = set(state.keep[b].tolist())
        bypassed = sorted(image_positions(family) - kept)
        routed = sorted(image_positions(family) & kept)
        assert len(bypassed) == 32
        assert torch.equal(after[b, bypassed], before[b, bypassed])
        assert not torch.allclose(after[b, routed], before[b, routed])


@pytest.mark.parametrize("family", ["dim", "zigma"])
def test_each_distinct_order_is_restricted_once_per_route(family, monkeypatch):
    calls = []
    permutation = routing_module.scan_permutation

    def counting(order, keep):
        calls.append(order.data_ptr())
        return permutation(order, keep)

    monkeypatch.setattr(routing_module, "scan_permutation", counting)
    depth = 9 if family == "dim" else 12
    model = build(family, routes=[(0, depth - 1, 0.5)], depth=depth, mixer_cls=Probe)
    model.train()
    with torch.no_grad():
        model(*model_inputs(3, INPUT))
    distinct = len(set(scans(family, depth)))
    assert len(calls) == len(set(calls)) == distinct
