"""ZigMa: shapes, parameter counts against a hand-derived formula, the zigzag schedule, initialisation
and errors."""


import pytest
import torch
import torch.nn as nn

from ssm_tread.diffusion import Guidance
from ssm_tread.models.layers import sincos_2d
from ssm_tread.models.zigma import ZIGMA_CONFIGS, ZigMa
from ssm_tread.scans import scan_order
from helpers import Probe, mamba_params, model_inputs, randomize_zero_parameters

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
    model = tiny(routes=routes, patch_size=patch_size, class_dropout_prob=0.1)
    randomize_zero_parameters(model)
    model.train()
    out, masks = model(*model_inputs(), return_masks=True)
    assert out.shape == (2, 8, 8, 8)
    assert masks.shape == (0 if routes is None else 1, 2, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pos_embed.grad is None
    assert all(p.grad.abs().sum() > 0 for p in model.blocks[2].mixer.parameters())


def zigma_params(d, depth, patch=2, in_channels=4, input_size=32, classes=1000):
    out_channels = 2 * in_channels
    tokens = (input_size // patch) ** 2
    return (
        in_channels * patch * patch * d + d  # patch embedding
        + tokens * d  # sin-cos position embedding (stored as a frozen parameter)
        + 256 * d + d + d * d + d  # timestep MLP
        + (classes + 1) * d  # label table with the null class
        + depth * (d + d * 3 * d + 3 * d + mamba_params(d, 16, 4, 2))  # RMSNorm weight, adaLN, mixer
        + d * 2 * d + 2 * d + d * patch * patch * out_channels + patch * patch * out_channels  # final layer
    )


@pytest.mark.parametrize("size, width, depth", [("S", 368, 24), ("B", 768, 24), ("H", 1536, 48)])
def test_parameter_count_matches_the_architecture(size, width, depth):
    for patch in (1, 2):
        config = ZIGMA_CONFIGS[f"ZigMa-{size}/{patch}"]
        assert config == dict(hidden_size=width, depth=depth, patch_size=patch)
        with torch.device("meta"):
            model = ZigMa(**config)
        assert sum(p.numel() for p in model.parameters()) == zigma_params(width, depth, patch)


def test_configs_cover_every_size_and_patch():
    sizes = {"S": (368, 24), "B": (768, 24), "M": (768, 48), "L": (1024, 48), "H": (1536, 48)}
    assert set(ZIGMA_CONFIGS) == {f"ZigMa-{s}/{p}" for s in sizes for p in (1, 2)}
    for name, config in ZIGMA_CONFIGS.items():
        assert (config["hidden_size"], config["depth"]) == sizes[name.split("-")[1].split("/")[0]]


@pytest.mark.parametrize("num_paths", [8, 3])
def test_layer_i_reads_zigzag_path_i_mod_num_paths(num_paths):
    model = tiny(depth=10, num_paths=num_paths, hidden_size=8, mixer_cls=Probe)
    for block in model.blocks:
        block.norm = nn.Identity()
    entering = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    model.eval()
    with torch.no_grad():
        model(*model_inputs())
    for i, block in enumerate(model.blocks):
        (seen,) = block.mixer.seen
        path = scan_order(f"zigzag{i % num_paths}", 4, 4)
        assert torch.equal(seen, entering[0][:, path])
    assert model.scan_orders.shape == (num_paths, 16)


def test_non_square_input():
    model = tiny(input_size=(8, 4), routes=[(1, 3, 0.5)])
    model.train()
    out, masks = model(torch.randn(2, 4, 8, 4), torch.rand(2), torch.zeros(2, dtype=torch.long), return_masks=True)
    assert out.shape == (2, 8, 8, 4) and masks.shape == (1, 2, 8, 4)


def test_mamba_initialisation_survives_and_adaln_starts_at_zero():
    model = tiny()
    for block in model.blocks:
        mixer = block.mixer
        dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert torch.allclose(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand_as(mixer.A_log))
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        assert not block.adaLN_modulation[-1].weight.any()
    assert not model.final_layer.linear.weight.any()
    expected = torch.from_numpy(sincos_2d(32, (4, 4))).float()
    torch.testing.assert_close(model.pos_embed[0], expected)
    assert not model.pos_embed.requires_grad


def test_contract_attributes_and_cfg():
    torch.manual_seed(0)
    model = tiny(learn_sigma=False, class_dropout_prob=0.1)
    randomize_zero_parameters(model)
    model.eval()
    assert (model.in_channels, model.out_channels, model.num_classes) == (4, 4, NUM_CLASSES)
    assert (model.input_size, model.patch_size, model.learn_sigma) == (8, 2, False)
    x, t, y = model_inputs()
    null = torch.full_like(y, NUM_CLASSES)
    with torch.no_grad():
        guided = Guidance(cfg_scale=2.0, guided_channels=3)(model, x, t, {"y": y}, 0.5)
        cond, uncond = model(x, t, y), model(x, t, null)
    assert guided.shape == (2, 4, 8, 8)
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 2.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:])


def test_errors_for_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        tiny(input_size=9, patch_size=2)
    with pytest.raises(ValueError, match="num_paths"):
        tiny(num_paths=9)
    with pytest.raises(ValueError, match="overlap"):
        tiny(routes=[(1, 3, 0.5), (3, 4, 0.5)])
    model = tiny()
    x, t, y = model_inputs()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 4, 8, 6), t, y)
    with pytest.raises(ValueError, match="expected t and y"):
        model(x, t.view(2, 1), y)
