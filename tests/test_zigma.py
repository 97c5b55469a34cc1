"""ZigMa: shapes, the official parameter counts, the zigzag scans, the official initialisation, the
extensions (null class, learned sigma, drop path, unconditional) and errors. (The forward pass against
a plain re-implementation of the official model: tests/test_official.py.)"""

import math

import pytest
import torch

from ssm_tread.diffusion import Guidance
from ssm_tread.models.layers import sincos_2d
from ssm_tread.models.zigma import ZIGMA_CONFIGS, ZigMa
from ssm_tread.scans import scan_order
from helpers import Probe, make_identity_blocks, model_inputs, randomize_zero_parameters

NUM_CLASSES = 10


def tiny(**overrides):
    kwargs = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_classes=NUM_CLASSES,
        class_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return ZigMa(**kwargs)


@pytest.mark.parametrize("routes", [None, [(1, 3, 0.5)]])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_forward_backward(routes, patch_size):
    torch.manual_seed(0)
    model = tiny(routes=routes, patch_size=patch_size, class_dropout_prob=0.1, learn_sigma=True, drop_path=0.1)
    randomize_zero_parameters(model)
    model.train()
    out, masks = model(*model_inputs(), return_masks=True)
    assert out.shape == (2, 8, 8, 8)
    assert masks.shape == (0 if routes is None else 1, 2, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.blocks[2].mixer.parameters())


# counted on the meta device from the official ZigMa (CompVis/zigma, 37d837b): 32x32x4 latent, patch 2, use_pe=2; (1000 classes, unconditional)
OFFICIAL_COUNTS = {
    "S": (31_776_080, 31_408_080),
    "B": (134_820_880, 134_052_880),
    "M": (267_863_056, 267_095_056),
    "L": (473_804_816, 472_780_816),
    "H": (1_060_669_456, 1_059_133_456),
}


def count(**kwargs):
    with torch.device("meta"):
        return sum(p.numel() for p in ZigMa(**kwargs).parameters())


@pytest.mark.parametrize("size", list(OFFICIAL_COUNTS))
def test_parameter_counts_are_the_official_ones(size):
    config = ZIGMA_CONFIGS[f"ZigMa-{size}/2"]
    conditional, unconditional = OFFICIAL_COUNTS[size]
    assert count(**config, class_dropout_prob=0.0) == conditional
    assert count(**config, num_classes=0) == unconditional
    # our extension: the null class row for classifier-free guidance
    assert count(**config, class_dropout_prob=0.1) == conditional + config["hidden_size"]


def test_zigma_b2_breakdown_and_position_embedding_options():
    with torch.device("meta"):
        model = ZigMa(**ZIGMA_CONFIGS["ZigMa-B/2"], class_dropout_prob=0.0)
    parts = {}
    for key, p in model.named_parameters():
        part = ("mixer" if ".mixer." in key else "adaLN" if "adaLN" in key else "norm" if key.startswith("blocks.")
                else key.split(".")[0])
        parts[part] = parts.get(part, 0) + p.numel()
    assert parts == {"mixer": 90_501_120, "adaLN": 42_522_624, "y_embedder": 768_000, "t_embedder": 787_968,
                     "pos_embed": 196_608, "norm": 18_432, "x_embedder": 13_056, "final_layer": 12_304, "norm_f": 768}
    assert count(**ZIGMA_CONFIGS["ZigMa-B/2"], num_classes=0, pos_embed="none") == 133_856_272


def test_configs_cover_every_size_and_patch():
    sizes = {"S": (368, 24), "B": (768, 24), "M": (768, 48), "L": (1024, 48), "H": (1536, 48)}
    assert set(ZIGMA_CONFIGS) == {f"ZigMa-{s}/{p}" for s in sizes for p in (1, 2, 4)}
    for name, config in ZIGMA_CONFIGS.items():
        assert (config["hidden_size"], config["depth"]) == sizes[name.split("-")[1].split("/")[0]]
        assert config["patch_size"] == int(name.split("/")[1])


@pytest.mark.parametrize("num_paths", [8, 3])
def test_layer_i_reads_zigzag_path_i_mod_num_paths(num_paths):
    """Identity blocks: block i reads 2^i times the tokens (r doubles each block), along its path."""
    model = tiny(depth=10, num_paths=num_paths, hidden_size=8, mixer_cls=Probe)
    make_identity_blocks(model)
    entering = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: entering.append(args[0][..., :8]))
    model.eval()
    with torch.no_grad():
        model(*model_inputs())
    for i, block in enumerate(model.blocks):
        (seen,) = block.mixer.seen
        path = scan_order(f"zigzag{i % num_paths}", 4, 4)
        assert torch.equal(seen, 2**i * entering[0][:, path])
    assert model.scan_orders.shape == (num_paths, 16)


def test_non_square_input():
    model = tiny(input_size=(8, 4), routes=[(1, 3, 0.5)])
    model.train()
    out, masks = model(torch.randn(2, 4, 8, 4), torch.rand(2), torch.zeros(2, dtype=torch.long), return_masks=True)
    assert out.shape == (2, 4, 8, 4) and masks.shape == (1, 2, 8, 4)


def test_official_initialisation():
    """The official ZigMa (model_zigma.py initialize_weights, _init_weights): adaLN-zero blocks, out_proj U(+-1/sqrt E) / sqrt(L), a default-init (non-zero)
    output Linear, xavier patch conv, N(0, 0.02) timestep MLP and table, zero biases, zero learned pos_embed."""
    torch.manual_seed(0)
    d, depth = 64, 9
    model = tiny(hidden_size=d, depth=depth, input_size=16, class_dropout_prob=0.1)
    out_proj = torch.stack([block.mixer.out_proj.weight for block in model.blocks])
    bound = 1 / math.sqrt(2 * d) / math.sqrt(depth)
    assert out_proj.abs().max() <= bound and abs(out_proj.std() / (bound / math.sqrt(3)) - 1) < 0.05
    for block in model.blocks:
        mixer = block.mixer
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand_as(mixer.A_log))
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    final = model.final_layer.linear
    assert final.weight.abs().min() > 0 and final.weight.abs().max() <= 1 / math.sqrt(d) and not final.bias.any()
    patch = model.x_embedder.proj.weight
    xavier = math.sqrt(6 / (d + patch[0].numel()))
    assert patch.abs().max() <= xavier and abs(patch.std() / (xavier / math.sqrt(3)) - 1) < 0.1
    for table in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(table.std() / 0.02 - 1) < 0.1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("dt_proj"):
            assert module.bias is None or not module.bias.any(), name
    assert not model.pos_embed.any() and model.pos_embed.requires_grad
    sincos = tiny(pos_embed="sincos")
    torch.testing.assert_close(sincos.pos_embed[0], torch.from_numpy(sincos_2d(32, (4, 4))).float())
    assert not sincos.pos_embed.requires_grad
    assert tiny(pos_embed="none").pos_embed is None


def test_contract_attributes_and_guidance():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=0.1)
    randomize_zero_parameters(model)
    model.eval()
    assert (model.in_channels, model.out_channels, model.num_classes) == (4, 4, NUM_CLASSES)
    assert (model.input_size, model.patch_size, model.learn_sigma) == (8, 2, False)
    x, t, y = model_inputs()
    null = torch.full_like(y, NUM_CLASSES)
    with torch.no_grad():
        guided = Guidance(cfg_scale=2.0, guided_channels=3)(model, x, t, {"y": y}, time=0.5)
        cond, uncond = model(x, t, y), model(x, t, null)
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 2.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:])


def test_unconditional_model_ignores_labels():
    torch.manual_seed(0)
    model = tiny(num_classes=0)
    randomize_zero_parameters(model)
    model.eval()
    x, t, y = model_inputs()
    assert model.y_embedder is None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), model(x, t, y + 1), rtol=0, atol=0)


def test_drop_path_follows_the_official_rates_and_acts_in_training_only():
    model = tiny(depth=5, drop_path=0.2)
    assert model.drop_rates == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.15]) and model.final_drop_rate == 0.2
    torch.manual_seed(0)
    randomize_zero_parameters(model)
    plain = tiny(depth=5)
    plain.load_state_dict(model.state_dict())
    x, t, y = model_inputs(batch=8)
    with torch.no_grad():
        model.eval(), plain.eval()
        torch.testing.assert_close(model(x, t, y), plain(x, t, y), rtol=0, atol=0)
        model.train(), plain.train()
        assert not torch.allclose(model(x, t, y), plain(x, t, y))


def test_errors_for_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        tiny(input_size=9, patch_size=2)
    with pytest.raises(ValueError, match="num_paths"):
        tiny(num_paths=9)
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="rope")
    with pytest.raises(ValueError, match="drop_path"):
        tiny(drop_path=1.0)
    with pytest.raises(ValueError, match="overlap"):
        tiny(routes=[(1, 3, 0.5), (3, 4, 0.5)])
    model = tiny()
    x, t, y = model_inputs()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 4, 8, 6), t, y)
    with pytest.raises(ValueError, match="expected t and y"):
        model(x, t.view(2, 1), y)


def test_macs_match_a_hand_count():
    """count_macs of a small ZigMa against the architecture, full and with route 1..3 at ratio 0.5."""
    from ssm_tread.models import count_macs

    d, e, r, n_state, k, tokens = 32, 64, 2, 16, 4, 16

    def mixer(n):
        return n * (d * 2 * e + e * k + e * (r + 2 * n_state) + r * e + e * d) + 2 * n * e * n_state

    def total(tokens_per_block):
        macs = tokens * d * 4 * 4 + 256 * d + d * d  # patches, timestep MLP
        macs += sum(d * 3 * d + mixer(n) for n in tokens_per_block)  # per-block adaLN, mixer
        return macs + tokens * d * 4 * 4  # final Linear (no adaLN)

    assert count_macs(tiny(), routed=False) == total([16] * 5)
    assert count_macs(tiny(routes=[(1, 3, 0.5)]), routed=True) == total([16, 8, 8, 8, 16])
