"""DiM: shapes, the official parameter counts, the sequence layout, the official scans and skip
pairing, long skips across route boundaries, the official initialisation, guidance and errors.
(The forward pass against a plain re-implementation of the official model: tests/test_official.py.)"""

import math

import pytest
import torch

from ssm_tread.diffusion import Guidance
from ssm_tread.models.dim import DIM_CONFIGS, DiM
from ssm_tread.scans import scan_order
from helpers import Probe, capture_passes, make_identity_blocks, model_inputs

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
    model = tiny(routes=routes, class_dropout_prob=0.1, learn_sigma=True)
    model.train()
    out, masks = model(*model_inputs(), return_masks=True)
    assert out.shape == (2, 8, 8, 8)
    assert masks.shape == (0 if routes is None else 1, 2, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.blocks[2].mixer.parameters())


def test_every_gradient_has_its_parameters_layout():
    """DDP copies gradients into buckets laid out like the parameters and warns ("Grad strides do not
    match bucket view strides") for any other layout; the depthwise convs once got channels-last ones."""
    model = tiny(routes=[(1, 3, 0.5)])
    model(*model_inputs()).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())


# counted on the meta device from the official DiM (tyshiwo1/DiM-DiffusionMamba, 292b228): total, mixers, skip Linears, adaLN-single (timestep MLP and class
# table included), label_emb (our class_tokens), proj_out_1 (our final adaLN), additional_embed (our pos_embed)
OFFICIAL_COUNTS = {
    "DiM-H/2": (862_407_184, 730_662_912, 113_319_936, 11_375_616, 1_537_536, 4_721_664, 396_288),
    "DiM-L/2": (386_063_376, 326_545_408, 50_380_800, 5_486_592, 1_025_024, 2_099_200, 264_192),
}


def closed_form_count(width: int, depth: int, patch: int = 2, channels: int = 4, classes: int = 1000,
                      grid: int = 16, d_state: int = 16, d_conv: int = 3, expand: int = 2) -> int:
    """DiM's parameters counted by hand from the official layout (tyshiwo1/DiM-DiffusionMamba, Mamba2DModel),
    with the null class row in both label tables and learn_sigma=False."""
    D, E, N, R = width, expand * width, d_state, math.ceil(width / 16)
    mixer = D * 2 * E + E * d_conv + E + E * (R + 2 * N) + R * E + E + E * N + E + E * D
    skip = 2 * (D * D + D) if D > 512 else 2 * D * D + D
    blocks = depth * (mixer + D + 3 * D) + (depth - 1) // 2 * skip  # + RMSNorm, the [3, D] table
    embeddings = (channels * patch * patch * D + D  # patch conv
                  + (2 + grid * grid) * D  # position embedding of [tau, kappa, patches]
                  + 2 * (9 * D + D)  # in_conv, out_conv (depthwise 3x3)
                  + 256 * D + D + D * D + D  # timestep MLP
                  + 2 * (classes + 1) * D  # adaLN label table and class-token table
                  + 2 * 3 * D  # learned and padding tokens
                  + D * 3 * D + 3 * D)  # adaLN-single
    final = D + D * 2 * D + 2 * D + D * patch * patch * channels + patch * patch * channels
    return blocks + embeddings + final


@pytest.mark.parametrize("name, count", [("DiM-L/2", 386_063_376), ("DiM-H/2", 862_407_184),  # official
                                         ("DiM-S/2", 29_535_376), ("DiM-B/2", 114_007_312)])  # ours
def test_parameter_counts_match_a_closed_form(name, count):
    width, depth = DIM_CONFIGS[name]["hidden_size"], DIM_CONFIGS[name]["depth"]
    assert closed_form_count(width, depth) == count  # the hand count holds the official totals
    with torch.device("meta"):
        model = DiM(**DIM_CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", ["DiM-H/2", "DiM-L/2"])
def test_parameter_counts_are_the_official_ones(name):
    with torch.device("meta"):
        model = DiM(**DIM_CONFIGS[name], learn_sigma=False)
    counts = {}
    for key, p in model.named_parameters():
        part = ("mixer" if ".mixer." in key else "skip" if ".skip_linear." in key
                else "adaln_single" if key.split(".")[0] in ("t_embedder", "y_embedder", "adaLN_modulation")
                else "final_adaln" if key.startswith("final_layer.adaLN_modulation") else key.split(".")[0])
        counts[part] = counts.get(part, 0) + p.numel()
    total, mixers, skips, adaln_single, class_tokens, final_adaln, pos_embed = OFFICIAL_COUNTS[name]
    assert sum(counts.values()) == total
    assert (counts["mixer"], counts["skip"], counts["adaln_single"]) == (mixers, skips, adaln_single)
    assert (counts["class_tokens"], counts["final_adaln"], counts["pos_embed"]) == (class_tokens, final_adaln, pos_embed)


def test_sequence_layout_and_scan_orders_over_the_whole_sequence():
    model = tiny(input_size=8)  # 4x4 grid, padded to 7x7
    assert model.seq_len == 5 + 7 * 7
    assert model.grid_positions.tolist() == [5 + r * 7 + c for r in range(4) for c in range(4)]
    for i, name in enumerate(model.scans):
        order = model.scan_orders[model.block_scan[i]].tolist()
        assert order[:5] == [0, 1, 2, 3, 4]  # prefix first, also in the reverse scans
        assert order[5:] == [5 + j for j in scan_order(name, 7, 7).tolist()]


def test_scans_follow_the_official_rule():
    """The official DiM (mamba_2d.py): block 0 raster; blocks 1..m-1 pattern i mod 4; then one step back per
    block; the last block raster (m = 1 + (L-1)/2); patterns raster, reverse, column, column reverse."""
    names = ["raster", "raster_rev", "column", "column_rev"]
    for depth in (5, 9, 49):
        m, k = 1 + (depth - 1) // 2, [0]
        for i in range(1, depth):
            k.append(0 if i == depth - 1 else i % 4 if i < m else (k[-1] - 1) % 4)
        model = tiny(depth=depth, hidden_size=8, mixer_cls=Probe)
        assert model.scans == [names[j] for j in k]


def record_skips(model, width=32):
    """Hooks: {block: its output} and {fusing block: the skip it fuses} (the one-Linear fusion's second half)."""
    outputs, skips = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach()))
        if block.skip_linear is not None:
            block.skip_linear.register_forward_pre_hook(
                lambda m, args, i=i: skips.__setitem__(i, args[0][..., width:].detach())
            )
    return outputs, skips


def test_long_skips_pair_blocks_as_the_official_model():
    """Depth 7: blocks 1..3 store their outputs (block 0 does not); block 4 fuses 3, 5 fuses 2, 6 fuses 1."""
    torch.manual_seed(0)
    model = tiny(depth=7)
    outputs, skips = record_skips(model)
    model.eval()
    with torch.no_grad():
        model(*model_inputs())
    assert sorted(skips) == [4, 5, 6]
    for fusing, stored in ((4, 3), (5, 2), (6, 1)):
        assert torch.equal(skips[fusing], outputs[stored])


def test_skip_stored_inside_a_route_is_fused_at_full_length_after_it():
    """Route 1..4 of 7 blocks: block 4 fuses block 3's output (same route) as it is; blocks 5 and 6
    fuse blocks 2 and 1's (taken inside the route) brought back to full length over the route-start state."""
    torch.manual_seed(0)
    model = tiny(depth=7, routes=[(1, 4, 0.5)])
    model.train()
    passes = capture_passes(model)
    outputs, skips = record_skips(model)
    with torch.no_grad():
        model(*model_inputs())
    (state,) = passes[-1].finished
    batch, kept = state.keep.shape
    assert skips[4].shape == (batch, kept, 32) and torch.equal(skips[4], outputs[3])
    for fusing, stored in ((5, 2), (6, 1)):
        expected = outputs[0].clone()  # the route-start state
        for b in range(batch):
            for j, position in enumerate(state.keep[b].tolist()):
                expected[b, position] = outputs[stored][b, j]
        assert skips[fusing].shape == (batch, model.seq_len, 32)
        assert torch.equal(skips[fusing], expected)


def test_skip_stored_before_a_route_is_gathered_inside_it():
    """Route 3..5 of 7 blocks: block 5 (in the route) fuses block 2's full-length output at the kept tokens."""
    torch.manual_seed(0)
    model = tiny(depth=7, routes=[(3, 5, 0.5)])
    model.train()
    passes = capture_passes(model)
    outputs, skips = record_skips(model)
    with torch.no_grad():
        model(*model_inputs())
    (state,) = passes[-1].finished
    expected = torch.stack([outputs[2][b, state.keep[b]] for b in range(state.keep.shape[0])])
    assert torch.equal(skips[5], expected)


def test_prefix_and_padding_tokens_are_never_routed():
    """Every kept set holds all prefix and padding positions, and a routed block reads them at their
    places in its restricted order (identity blocks: the probe sees the entering rows)."""
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
        full = [0, 1, 2, 3, 4] + [5 + j for j in scan_order(model.scans[i], 7, 7).tolist()]
        for b in range(seen.shape[0]):
            kept = set(state.keep[b].tolist())
            assert set(fixed) <= kept
            restricted = [p for p in full if p in kept]
            assert torch.equal(seen[b], entering[0][b, restricted])


def test_official_initialisation():
    """The official DiM (utils/init_weights.py): not adaLN-Zero; out_proj U(+-1/sqrt E) / sqrt(L); tables N(0, 1)/sqrt(D)."""
    torch.manual_seed(0)
    d, depth = 64, 9
    model = tiny(hidden_size=d, depth=depth, input_size=16)
    e = 2 * d
    out_proj = torch.stack([block.mixer.out_proj.weight for block in model.blocks])
    bound = 1 / math.sqrt(e) / math.sqrt(depth)
    assert out_proj.abs().max() <= bound and abs(out_proj.std() / (bound / math.sqrt(3)) - 1) < 0.05
    for block in model.blocks:
        mixer = block.mixer
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand_as(mixer.A_log))
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    tables = torch.stack([block.scale_shift_table for block in model.blocks])
    assert abs(tables.std() * math.sqrt(d) - 1) < 0.1
    adaln = model.adaLN_modulation[-1].weight  # PyTorch's default U(+-1/sqrt D): non-zero
    assert adaln.abs().max() <= 1 / math.sqrt(d) and abs(adaln.std() * math.sqrt(3 * d) - 1) < 0.1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
            assert not module.bias.any(), name
    for table in (model.y_embedder.embedding_table.weight, model.class_tokens.weight, model.t_embedder.mlp[0].weight):
        assert abs(table.std() / 0.02 - 1) < 0.1
    assert not model.pos_embed.any()
    assert model.final_layer.linear.weight.abs().min() > 0
    assert model(*model_inputs(size=16)).abs().mean() > 0  # unlike adaLN-Zero, the untrained model is not zero


def test_contract_attributes_and_guidance():
    torch.manual_seed(0)
    model = tiny(learn_sigma=True, class_dropout_prob=0.1)
    model.eval()
    assert (model.in_channels, model.out_channels, model.num_classes) == (4, 8, NUM_CLASSES)
    assert (model.input_size, model.patch_size, model.learn_sigma) == (8, 2, True)
    assert model.router.routes == ()
    x, t, y = model_inputs()
    null = torch.full_like(y, NUM_CLASSES)
    with torch.no_grad():
        guided = Guidance(cfg_scale=3.0, guided_channels=4)(model, x, t, {"y": y}, time=0.5)
        cond, uncond = model(x, t, y), model(x, t, null)
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])


def test_label_dropout_uses_the_null_class_in_both_tables():
    """With dropout 1 every training label becomes the null class, for the condition and the class token."""
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=1.0)
    x, t, y = model_inputs()
    with torch.no_grad():
        model.train()
        dropped = model(x, t, y)
        model.eval()
        torch.testing.assert_close(dropped, model(x, t, torch.full_like(y, NUM_CLASSES)), rtol=0, atol=0)
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1


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


def test_macs_match_a_hand_count():
    """count_macs of a small DiM against the architecture, full and with route 1..3 at ratio 0.5."""
    from ssm_tread.models import count_macs

    d, e, r, n_state, k = 32, 64, 2, 16, 3  # depth 5 (tiny)
    grid, seq = 16, 5 + 7 * 7  # 8x8 input, patch 2: a 4x4 grid padded to 7x7, plus 5 prefix tokens

    def mixer(tokens):
        return tokens * (d * 2 * e + e * k + e * (r + 2 * n_state) + r * e + e * d) + 2 * tokens * e * n_state

    def total(tokens_per_block):
        macs = grid * d * 4 * 4 + 2 * grid * d * 9 + 256 * d + d * d + d * 3 * d  # patches, convs, t MLP, adaLN-single
        macs += sum(mixer(tokens) for tokens in tokens_per_block)
        macs += sum(tokens_per_block[i] * 2 * d * d for i in (3, 4))  # skip fusion of blocks 3 and 4
        return macs + d * 2 * d + grid * d * 4 * 4  # final adaLN and Linear

    kept = seq - grid + (grid - grid // 2)
    assert count_macs(tiny(), routed=False) == total([seq] * 5)
    assert count_macs(tiny(routes=[(1, 3, 0.5)]), routed=True) == total([seq, kept, kept, kept, seq])
