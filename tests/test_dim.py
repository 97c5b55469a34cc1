"""DiM: shapes, parameter counts against a hand-derived formula, the sequence layout, the mirrored
schedule, long skips across route boundaries, initialisation and errors."""


import pytest
import torch

from ssm_tread.diffusion import Guidance
from ssm_tread.models.dim import DIM_CONFIGS, DiM
from ssm_tread.scans import scan_order
from helpers import Probe, capture_passes, make_identity_blocks, mamba_params, model_inputs, randomize_zero_parameters

NUM_CLASSES = 10


def tiny(**overrides):
    kwargs = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_classes=NUM_CLASSES,
        class_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return DiM(**kwargs)


@pytest.mark.parametrize("routes", [None, [(1, 3, 0.5)]])
def test_forward_backward(routes):
    torch.manual_seed(0)
    model = tiny(routes=routes, class_dropout_prob=0.1)
    randomize_zero_parameters(model)
    model.train()
    out, masks = model(*model_inputs(), return_masks=True)
    assert out.shape == (2, 8, 8, 8)
    assert masks.shape == (0 if routes is None else 1, 2, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.blocks[2].mixer.parameters())


def dim_params(d, depth, patch=2, in_channels=4, input_size=32, classes=1000):
    out_channels = 2 * in_channels
    grid = input_size // patch
    seq_len = 5 + (grid + 3) ** 2
    return (
        in_channels * patch * patch * d + d  # patch embedding
        + 2 * (9 * d + d)  # depthwise 3x3 convs before and after the blocks
        + 256 * d + d + d * d + d  # timestep MLP
        + (classes + 1) * d  # label table with the null class
        + 3 * d + 3 * d + seq_len * d  # learned tokens, padding tokens, position embedding
        + d * 3 * d + 3 * d  # adaLN-single
        + depth * (d + 3 * d + mamba_params(d, 16, 3, 2))  # RMSNorm weight, modulation table, mixer
        + (depth // 2) * (2 * d * d + d)  # long-skip fusion
        + d * 2 * d + 2 * d + d * patch * patch * out_channels + patch * patch * out_channels  # final layer
    )


@pytest.mark.parametrize("name, width, published", [("DiM-L/2", 1024, 386e6), ("DiM-H/2", 1536, 860e6)])
def test_parameter_count_matches_the_architecture_and_the_paper(name, width, published):
    with torch.device("meta"):
        model = DiM(**DIM_CONFIGS[name])
    count = sum(p.numel() for p in model.parameters())
    assert DIM_CONFIGS[name]["hidden_size"] == width and DIM_CONFIGS[name]["depth"] == 49
    assert count == dim_params(width, 49)
    assert abs(count / published - 1) < 0.03


def test_sequence_layout_and_scan_orders_over_the_whole_sequence():
    model = tiny(input_size=8)  # 4x4 grid, padded to 7x7
    assert model.seq_len == 5 + 7 * 7
    assert model.grid_positions.tolist() == [5 + r * 7 + c for r in range(4) for c in range(4)]
    for i, name in enumerate(model.schedule):
        order = model.scan_orders[model.block_scan[i]].tolist()
        assert order[:5] == [0, 1, 2, 3, 4]  # prefix first, also in the reverse scans
        assert order[5:] == [5 + j for j in scan_order(name, 7, 7).tolist()]


def test_schedule_is_mirrored_for_the_long_skips():
    """Block depth-1-k reads the same order as block k, whose output it fuses (checked with probes)."""
    depth = 49
    model = tiny(depth=depth, hidden_size=8, mixer_cls=Probe)
    make_identity_blocks(model)
    model.eval()
    with torch.no_grad():
        model(*model_inputs())
    assert model.schedule[0] == model.schedule[-1] == "raster"
    assert model.schedule[1:5] == ["raster_rev", "column", "column_rev", "raster"]
    for k in range(depth // 2):
        (encoder,), (decoder,) = model.blocks[k].mixer.seen, model.blocks[depth - 1 - k].mixer.seen
        assert model.schedule[depth - 1 - k] == model.schedule[k]
        assert model.blocks[depth - 1 - k].skip_linear is not None and model.blocks[k].skip_linear is None
        # every block is the identity, so the same order means the same rows
        assert torch.equal(encoder, decoder)


def test_long_skips_are_fused_last_in_first_out():
    torch.manual_seed(0)
    model = tiny(depth=7)
    randomize_zero_parameters(model)
    outputs, skips = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach()))
        if block.skip_linear is not None:
            block.skip_linear.register_forward_pre_hook(
                lambda m, args, i=i: skips.__setitem__(i, args[0][..., 32:].detach())
            )
    model.eval()
    with torch.no_grad():
        model(*model_inputs())
    assert sorted(skips) == [4, 5, 6]
    for k in range(3):
        assert torch.equal(skips[6 - k], outputs[k])


def test_skip_stored_inside_a_route_is_fused_at_full_length_after_it():
    """Route 1..4 of 7 blocks: block 5 fuses block 1's output (taken inside the route) brought back to
    full length over the route-start state; block 4 fuses block 2's (same route) as it is."""
    torch.manual_seed(0)
    model = tiny(depth=7, routes=[(1, 4, 0.5)])
    randomize_zero_parameters(model)
    model.train()
    passes = capture_passes(model)
    outputs, skips = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach()))
        if block.skip_linear is not None:
            block.skip_linear.register_forward_pre_hook(
                lambda m, args, i=i: skips.__setitem__(i, args[0][..., 32:].detach())
            )
    with torch.no_grad():
        model(*model_inputs())
    (state,) = passes[-1].finished
    batch, kept = state.keep.shape
    assert skips[4].shape == (batch, kept, 32) and torch.equal(skips[4], outputs[2])
    assert skips[5].shape == (batch, model.seq_len, 32)
    expected = outputs[0].clone()  # the route-start state
    for b in range(batch):
        for j, position in enumerate(state.keep[b].tolist()):
            expected[b, position] = outputs[1][b, j]
    assert torch.equal(skips[5], expected)
    assert skips[6].shape == (batch, model.seq_len, 32) and torch.equal(skips[6], outputs[0])


def test_skip_stored_before_a_route_is_gathered_inside_it():
    """Route 2..5 of 7 blocks: block 5 (in the route) fuses block 1's full-length output at the kept tokens."""
    torch.manual_seed(0)
    model = tiny(depth=7, routes=[(2, 5, 0.5)])
    randomize_zero_parameters(model)
    model.train()
    passes = capture_passes(model)
    outputs, skips = {}, {}
    model.blocks[1].register_forward_hook(lambda m, args, out: outputs.__setitem__(1, out.detach()))
    model.blocks[5].skip_linear.register_forward_pre_hook(lambda m, args: skips.__setitem__(5, args[0][..., 32:]))
    with torch.no_grad():
        model(*model_inputs())
    (state,) = passes[-1].finished
    expected = torch.stack([outputs[1][b, state.keep[b]] for b in range(state.keep.shape[0])])
    assert torch.equal(skips[5], expected)


def test_prefix_and_padding_tokens_are_never_routed():
    model = tiny(input_size=8, hidden_size=8, depth=5, routes=[(1, 3, 0.75)], mixer_cls=Probe)
    make_identity_blocks(model)
    model.train()
    passes = capture_passes(model)
    entering = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    with torch.no_grad():
        model(*model_inputs())
    (state,) = passes[-1].finished
    grid = set(model.grid_positions.tolist())
    fixed = [p for p in range(model.seq_len) if p not in grid]
    assert len(fixed) == 5 + 7 * 7 - 16
    for i in (1, 2, 3):
        (seen,) = model.blocks[i].mixer.seen
        assert seen.shape[1] == len(fixed) + 16 - int(16 * 0.75)
        name = model.schedule[i]
        full = [0, 1, 2, 3, 4] + [5 + j for j in scan_order(name, 7, 7).tolist()]
        for b in range(seen.shape[0]):
            equal = (seen[b].unsqueeze(1) == entering[0][b].unsqueeze(0)).all(-1)  # [K, L]
            ids = equal.int().argmax(1).tolist()
            assert ids[:5] == [0, 1, 2, 3, 4]
            assert set(fixed) <= set(ids)
            kept = set(state.keep[b].tolist())
            restricted = [p for p in full if p in kept]
            for p in fixed:  # each prefix/padding token sits at its place in the restricted order
                assert ids.index(p) == restricted.index(p)


def test_mamba_initialisation_survives_and_adaln_starts_at_zero():
    model = tiny(hidden_size=32)
    for block in model.blocks:
        mixer = block.mixer
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand_as(mixer.A_log))
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        assert not torch.equal(mixer.in_proj.weight, torch.zeros_like(mixer.in_proj.weight))
        assert not block.scale_shift_table.any()
    assert not model.adaLN_modulation[-1].weight.any()
    assert not model.final_layer.linear.weight.any()
    out = model(*model_inputs())
    assert not out.any()  # adaLN-Zero style: the untrained model predicts zero


def test_contract_attributes_and_cfg():
    torch.manual_seed(0)
    model = tiny(learn_sigma=True, class_dropout_prob=0.1)  # with a null class
    randomize_zero_parameters(model)
    model.eval()
    assert (model.in_channels, model.out_channels, model.num_classes) == (4, 8, NUM_CLASSES)
    assert (model.input_size, model.patch_size, model.learn_sigma) == (8, 2, True)
    assert model.router.routes == ()
    x, t, y = model_inputs()
    null = torch.full_like(y, NUM_CLASSES)
    with torch.no_grad():
        guided = Guidance(cfg_scale=3.0, guided_channels=4)(model, x, t, {"y": y}, 0.5)
        cond, uncond = model(x, t, y), model(x, t, null)
    assert guided.shape == (2, 8, 8, 8)
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])


def test_errors_for_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        tiny(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="odd depth"):
        tiny(depth=4)
    with pytest.raises(ValueError, match="end < depth"):
        tiny(depth=5, routes=[(1, 5, 0.5)])
    model = tiny()
    x, t, y = model_inputs()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="expected t and y"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="expected t and y"):
        model(x, t, y.view(2, 1))
