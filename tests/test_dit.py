"""DiT: reference parameter counts and key layout, equivalence with the reference forward, routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssm_tread.diffusion import Guidance
from ssm_tread.models import create_model
from ssm_tread.models.dit import DiT
from ssm_tread.models.layers import token_masks_to_pixels
from ssm_tread.routing import Route

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (adaLN and final layer included) except the fixed position embedding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def small_dit(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return randomize(DiT(**{**SMALL, **overrides}), seed)


def inputs(batch: int = 3, size: int = 8, channels: int = 4, num_classes: int = 10, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.rand(batch, generator=generator) * 999
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    return x, t, y


# ---------------------------------------------------------------- reference sizes and layout


@pytest.mark.parametrize(
    "name, params",
    [("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416), ("DiT-L/2", 458_102_816), ("DiT-XL/2", 675_129_632)],
)
def test_parameter_count_matches_reference(name, params):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def reference_keys(depth: int, hidden: int, patch: int, channels: int, classes: int, tokens: int) -> dict:
    """The reference DiT state dict: key -> shape."""
    out = 2 * channels
    keys = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
    }
    for i in range(depth):
        keys.update(
            {
                f"blocks.{i}.attn.qkv.weight": (3 * hidden, hidden),
                f"blocks.{i}.attn.qkv.bias": (3 * hidden,),
                f"blocks.{i}.attn.proj.weight": (hidden, hidden),
                f"blocks.{i}.attn.proj.bias": (hidden,),
                f"blocks.{i}.mlp.fc1.weight": (4 * hidden, hidden),
                f"blocks.{i}.mlp.fc1.bias": (4 * hidden,),
                f"blocks.{i}.mlp.fc2.weight": (hidden, 4 * hidden),
                f"blocks.{i}.mlp.fc2.bias": (hidden,),
                f"blocks.{i}.adaLN_modulation.1.weight": (6 * hidden, hidden),
                f"blocks.{i}.adaLN_modulation.1.bias": (6 * hidden,),
            }
        )
    keys.update(
        {
            "final_layer.linear.weight": (patch * patch * out, hidden),
            "final_layer.linear.bias": (patch * patch * out,),
            "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
            "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
        }
    )
    return keys


def test_state_dict_layout_matches_reference_checkpoint():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    layout = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert layout == reference_keys(depth=28, hidden=1152, patch=2, channels=4, classes=1000, tokens=256)
    assert not model.pos_embed.requires_grad


def test_contract_attributes():
    model = DiT(**SMALL, routes=[{"start": 1, "end": 2, "ratio": 0.5}])
    assert (model.in_channels, model.out_channels, model.num_classes) == (4, 8, 10)
    assert (model.input_size, model.patch_size, model.learn_sigma) == (8, 2, True)
    assert model.router.routes == (Route(1, 2, 0.5),)
    assert DiT(**SMALL, learn_sigma=False).out_channels == 4


# ---------------------------------------------------------------- equivalence with the reference


def reference_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The reference 2D sin-cos embedding: meshgrid(w, h), first half from the w grid."""
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(half_dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(half_dim // 2, dtype=np.float64) / (half_dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)


def reference_forward(sd: dict, x, t, y, patch: int, heads: int, out_channels: int) -> torch.Tensor:
    """The reference DiT forward in plain torch ops, weights read from the state dict."""

    def linear(v, name):
        return F.linear(v, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(v, shift, scale):
        return F.layer_norm(v, (dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    batch, dim, gh, gw = h.shape
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(h.dtype)  # float32, then the weights' dtype
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = dim // heads
    for i in range(depth):
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, 1)
        qkv = linear(modulate(h, shift1, scale1), f"blocks.{i}.attn.qkv").reshape(batch, -1, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
        a = (attention @ v).transpose(1, 2).reshape(batch, -1, dim)
        h = h + gate1[:, None] * linear(a, f"blocks.{i}.attn.proj")
        m = F.gelu(linear(modulate(h, shift2, scale2), f"blocks.{i}.mlp.fc1"), approximate="tanh")
        h = h + gate2[:, None] * linear(m, f"blocks.{i}.mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(h, shift, scale), "final_layer.linear")
    h = h.reshape(batch, gh, gw, patch, patch, out_channels).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(batch, out_channels, gh * patch, gw * patch)


def test_pos_embed_equals_reference():
    model = DiT(**SMALL)
    expected = torch.from_numpy(reference_pos_embed(64, 4)).float().unsqueeze(0)
    torch.testing.assert_close(model.pos_embed.data, expected, rtol=0, atol=0)


def test_forward_equals_reference_dit():
    model = small_dit().eval()
    x, t, y = inputs(batch=4)
    y[-1] = model.num_classes  # the null class
    with torch.no_grad():
        out = model(x, t, y)
        expected = reference_forward(model.state_dict(), x, t, y, patch=2, heads=4, out_channels=8)
    assert out.shape == (4, 8, 8, 8)
    assert expected.abs().max() > 0.1
    assert (out - expected).abs().max() <= 1e-5


def test_reference_state_dict_loads_strictly():
    source = small_dit(seed=3)
    target = DiT(**SMALL)
    target.load_state_dict(source.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x, t, y), source.eval()(x, t, y), rtol=0, atol=0)


def test_default_init_is_adaln_zero():
    model = DiT(**SMALL)
    x, t, y = inputs()
    assert torch.all(model(x, t, y) == 0)
    for block in model.blocks:
        assert torch.all(block.adaLN_modulation[-1].weight == 0)
        assert block.attn.qkv.weight.std() > 0


# ---------------------------------------------------------------- routing


def test_ratio_zero_route_gives_unrouted_output():
    model = small_dit(class_dropout_prob=0.0, routes=[{"start": 1, "end": 2, "ratio": 0.0}])
    x, t, y = inputs()
    with torch.no_grad():
        routed, masks = model.train()(x, t, y, return_masks=True)
        full = model.eval()(x, t, y)
    assert masks.shape == (1, 3, 8, 8) and masks.all()
    torch.testing.assert_close(routed, full, rtol=0, atol=1e-6)


def test_routes_act_in_training_only():
    plain = small_dit(class_dropout_prob=0.0)
    routed = DiT(**SMALL, class_dropout_prob=0.0, routes=[Route(1, 2, 0.5)])
    routed.load_state_dict(plain.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        reference = plain.eval()(x, t, y)
        assert torch.equal(routed.eval()(x, t, y), reference)
        assert not torch.allclose(routed.train()(x, t, y), reference, atol=1e-3)
        routed.eval()
        with routed.router.forced():
            assert not torch.allclose(routed(x, t, y), reference, atol=1e-3)


def test_masks_shape_and_counts():
    model = small_dit(routes=[Route(0, 1, 0.5), Route(2, 3, 0.25)])
    x, t, y = inputs(batch=2)
    _, masks = model.train()(x, t, y, return_masks=True)
    assert masks.shape == (2, 2, 8, 8) and masks.dtype == torch.bool
    pixels_per_token = 2 * 2
    assert masks[0].flatten(1).sum(1).tolist() == [8 * pixels_per_token] * 2  # 16 tokens, keep 8
    assert masks[1].flatten(1).sum(1).tolist() == [12 * pixels_per_token] * 2  # keep 16 - 4
    _, masks = model.eval()(x, t, y, return_masks=True)
    assert masks.shape == (0, 2, 8, 8)


def test_bypassed_tokens_skip_every_block():
    """A route over all blocks: bypassed pixels get the output of the final layer on the embeddings."""
    model = small_dit(class_dropout_prob=0.0, routes=[Route(0, 3, 0.5)]).train()
    x, t, y = inputs(batch=2)
    with torch.no_grad():
        out, masks = model(x, t, y, return_masks=True)
        c = model.t_embedder(t) + model.y_embedder(y, False)
        tokens = model.final_layer(model.x_embedder(x) + model.pos_embed, c)
        no_blocks = tokens.reshape(2, 4, 4, 2, 2, 8).permute(0, 5, 1, 3, 2, 4).reshape(2, 8, 8, 8)
    bypassed = ~masks[0].unsqueeze(1).expand_as(out)
    torch.testing.assert_close(out[bypassed], no_blocks[bypassed], rtol=0, atol=1e-6)
    assert not torch.allclose(out[~bypassed], no_blocks[~bypassed], atol=1e-3)


def test_block_after_route_runs_in_fp32_under_autocast():
    model = small_dit(routes=[Route(0, 1, 0.5)]).train()
    dtypes = {}
    for i, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_hook(lambda m, a, o, i=i: dtypes.__setitem__(i, o.dtype))
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
    assert dtypes == {0: torch.bfloat16, 1: torch.bfloat16, 2: torch.float32, 3: torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(x, t, y)  # no route taken: no block follows one
    assert dtypes[2] == torch.bfloat16
    model.train().fp32_after_route = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
    assert dtypes[2] == torch.bfloat16


def test_routed_backward_reaches_every_block():
    model = small_dit(routes=[Route(1, 2, 0.5)]).train()
    model(*inputs()).square().mean().backward()
    for block in model.blocks:
        assert block.attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- guidance


def cond_and_uncond(model, x, t, y):
    """The model's outputs for the labels and for the null class, as two separate plain calls."""
    with torch.no_grad():
        return model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))


@pytest.mark.parametrize("guided_channels", [3, 4])
def test_guidance_on_a_dit_matches_the_reference_formula(guided_channels):
    # the reference DiT's forward_with_cfg: eps = uncond + s * (cond - uncond) on the first 3 channels,
    # the rest (the learned variance) from the conditional half
    model = small_dit().eval().double()  # float64: one batch of 2B and two of B round alike
    x, t, y = inputs()
    x = x.double()
    cond, uncond = cond_and_uncond(model, x, t, y)
    with torch.no_grad():
        guided = Guidance(cfg_scale=4.0, guided_channels=guided_channels)(model, x, t, {"y": y}, 0.5)
    c = guided_channels
    expected = torch.cat([uncond[:, :c] + 4.0 * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-10)
    assert not torch.allclose(guided[:, :c], cond[:, :c], atol=1e-3)


# ---------------------------------------------------------------- shapes and helpers


@pytest.mark.parametrize(
    "shape", [(2, 3, 8, 8), (2, 4, 8, 6), (2, 4, 16, 16), (4, 8, 8)], ids=["channels", "width", "size", "3d"]
)
def test_bad_input_shape_is_reported(shape):
    model = DiT(**SMALL)
    with pytest.raises(ValueError, match=r"expected input \[B, 4, 8, 8\]"):
        model(torch.zeros(shape), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_bad_timestep_or_label_shape_is_reported():
    model = DiT(**SMALL)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="t and y"):
        model(x, torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="t and y"):
        model(x, torch.zeros(2), torch.zeros(3, dtype=torch.long))


def test_patch_size_must_divide_input():
    with pytest.raises(ValueError, match="not divisible"):
        DiT(**{**SMALL, "patch_size": 3})


def test_rectangular_input():
    model = small_dit(input_size=(8, 12), routes=[Route(1, 2, 0.5)]).train()
    out, masks = model(torch.randn(2, 4, 8, 12), torch.rand(2), torch.zeros(2, dtype=torch.long), return_masks=True)
    assert out.shape == (2, 8, 8, 12) and masks.shape == (1, 2, 8, 12)


def test_token_masks_to_pixels():
    masks = torch.tensor([[[True, False, False, True, True, False]]])  # R=1, B=1, 2x3 grid
    pixels = token_masks_to_pixels(masks, (2, 3), 2)
    expected = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert pixels.shape == (1, 1, 4, 6)
    assert torch.equal(pixels[0, 0], expected)
    with pytest.raises(ValueError, match="2x3 grid"):
        token_masks_to_pixels(masks[..., :5], (2, 3), 2)


def test_layers_equal_timms_that_the_reference_dit_trained_with():
    """The reference DiT builds its blocks from timm's PatchEmbed, Attention and Mlp: ours load into them
    strictly (the same parameter names) and compute the same."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from timm.layers import Mlp as TimmMlp
    from timm.layers import PatchEmbed as TimmPatchEmbed

    from ssm_tread.models.dit import Attention, Mlp
    from ssm_tread.models.layers import PatchEmbed

    torch.manual_seed(0)
    pairs = [(Attention(64, 4), timm_vit.Attention(64, num_heads=4, qkv_bias=True), torch.randn(2, 10, 64)),
             (Mlp(64, 256), TimmMlp(64, 256, act_layer=lambda: torch.nn.GELU(approximate="tanh")),
              torch.randn(2, 10, 64)),
             (PatchEmbed(16, 2, 4, 64), TimmPatchEmbed(16, 2, 4, 64, bias=True), torch.randn(2, 4, 16, 16))]
    for ours, theirs, x in pairs:
        theirs.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
