"""Official DiM and ZigMa: ``load_official`` reproduces the official forward, checked against plain
re-implementations written in this file from the official code of CompVis/zigma (37d837b) and
tyshiwo1/DiM-DiffusionMamba (292b228) (official key names, a loop over the blocks, a sequential selective scan), on random official-format state dicts.

The example configs: D=64, L=9, a 16x16x4
latent, p=2, 10 classes (378,832 DiM and 434,192 ZigMa parameters). Every weight is random, so
zero-initialised parts cannot hide a wiring difference.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssm_tread import sampling
from ssm_tread.diffusion import GaussianDiffusion
from ssm_tread.models import create_model, load_official
from ssm_tread.models.official import to_official, to_ours, unwrap_state_dict
from ssm_tread.checkpoint import CheckpointError
from ssm_tread.train.config import load_config
from ssm_tread.train.trainer import train

C, P, CLASSES, N_STATE = 4, 2, 10, 16
# The forward parity runs in float64 on float32-representable weights: two correct float32 computations in
# another order differ by ~1e-4 at these depths (and by how much depends on the CPU), float64 ones by ~1e-12.
REFERENCE_DTYPE = torch.float64
PARITY_TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------------------
# Official state-dict layouts (the key names and shapes of the two official repositories)


def mixer_shapes(d, k):
    e, r = 2 * d, math.ceil(d / 16)
    return {
        "in_proj.weight": (2 * e, d), "conv1d.weight": (e, 1, k), "conv1d.bias": (e,),
        "x_proj.weight": (r + 2 * N_STATE, e), "dt_proj.weight": (e, r), "dt_proj.bias": (e,),
        "A_log": (e, N_STATE), "D": (e,), "out_proj.weight": (d, e),
    }


def zigma_layout(d, depth, size, classes=CLASSES, channels=C):
    n = (size // P) ** 2
    shapes = {
        "pos_embed": (1, n, d), "x_embedder.proj.weight": (d, channels, P, P), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
    }
    if classes:
        shapes["y_embedder.embedding_table.weight"] = (classes, d)
    for i in range(depth):
        shapes.update({f"blocks.{i}.mixer.{k}": v for k, v in mixer_shapes(d, 4).items()})
        shapes.update({f"blocks.{i}.norm.weight": (d,), f"blocks.{i}.adaLN_modulation.1.weight": (3 * d, d),
                       f"blocks.{i}.adaLN_modulation.1.bias": (3 * d,)})
    shapes.update({"final_layer.linear.weight": (P * P * channels, d), "final_layer.linear.bias": (P * P * channels,),
                   "norm_f.weight": (d,)})
    return shapes


def dim_layout(d, depth, size, classes=CLASSES, channels=C):
    n = (size // P) ** 2
    shapes = {"additional_embed": (1, 2 + n, d), "pos_embed.proj.weight": (d, channels, P, P), "pos_embed.proj.bias": (d,)}
    for i in range(depth):
        shapes.update({f"transformer_blocks.{i}.scale_shift_table": (3, d), f"transformer_blocks.{i}.norm1.norm.weight": (d,)})
        shapes.update({f"transformer_blocks.{i}.attn1.{k}": v for k, v in mixer_shapes(d, 3).items()})
        if i > (depth - 1) // 2:
            if d <= 512:
                shapes.update({f"transformer_blocks.{i}.skip_linear.weight": (d, 2 * d),
                               f"transformer_blocks.{i}.skip_linear.bias": (d,)})
            else:
                for j in (0, 1):
                    shapes.update({f"transformer_blocks.{i}.skip_linear.{j}.weight": (d, d),
                                   f"transformer_blocks.{i}.skip_linear.{j}.bias": (d,)})
    shapes.update({
        "norm_out.norm.weight": (d,),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
        "adaln_single.emb.class_embedder.embedding_table.weight": (classes + 1, d),
        "adaln_single.linear.weight": (3 * d, d), "adaln_single.linear.bias": (3 * d,),
        "label_emb.weight": (classes + 1, d),
        "a4m_adapter.pad_token_dec_split": (1, 3, d), "a4m_adapter.pad_token": (1, d, 3),
        "a4m_adapter.first_smoother.weight": (d, 1, 3, 3), "a4m_adapter.first_smoother.bias": (d,),
        "a4m_adapter.last_smoother.weight": (d, 1, 3, 3), "a4m_adapter.last_smoother.bias": (d,),
        "proj_out_2.weight": (P * P * channels, d), "proj_out_2.bias": (P * P * channels,),
        "proj_out_1.weight": (2 * d, d), "proj_out_1.bias": (2 * d,),
    })
    return shapes


def random_state(shapes, seed=0):
    """Random weights of sensible scale: matrices ~ N(0, 1/fan_in), vectors and tables ~ N(0, 0.3^2),
    norm weights 1 + N(0, 0.1^2), A_log = log(1..N) + noise, dt biases giving dt around 0.01-0.1."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if key.endswith("A_log"):
            value = torch.log(torch.arange(1, shape[-1] + 1.0)).expand(shape) + 0.1 * noise
        elif key.endswith("dt_proj.bias"):
            value = -3.0 + 0.5 * noise
        elif "norm" in key and key.endswith("weight"):
            value = 1 + 0.1 * noise
        elif len(shape) >= 2 and "embed" not in key and "table" not in key and "token" not in key:
            value = noise / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.3 * noise
        state[key] = value
    return state


# ----------------------------------------------------------------------------------------------------
# Plain re-implementations of the official forward passes


def sinusoid(t, size):
    """Computed in float32, as both official codes do, then in the reference's dtype."""
    half = size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(REFERENCE_DTYPE)


def rms_norm(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def mamba(sd, prefix, x):
    """The Mamba-1 mixer on x [B, L, D], with a sequential scan."""
    w = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    batch, length, d = x.shape
    e = w["in_proj.weight"].shape[0] // 2
    r = w["dt_proj.weight"].shape[1]
    xz = x @ w["in_proj.weight"].T
    u, z = xz[..., :e], xz[..., e:]  # [B, L, E]
    k = w["conv1d.weight"].shape[-1]
    padded = torch.cat([u.new_zeros(batch, k - 1, e), u], dim=1)
    conv = sum(w["conv1d.weight"][:, 0, j] * padded[:, j:j + length] for j in range(k)) + w["conv1d.bias"]
    u = F.silu(conv)
    dbc = u @ w["x_proj.weight"].T
    dt_low, b_ssm, c_ssm = dbc[..., :r], dbc[..., r:r + N_STATE], dbc[..., r + N_STATE:]
    dt = F.softplus(dt_low @ w["dt_proj.weight"].T + w["dt_proj.bias"])  # [B, L, E]
    a = -torch.exp(w["A_log"])  # [E, N]
    h = u.new_zeros(batch, e, N_STATE)
    ys = []
    for step in range(length):
        h = torch.exp(dt[:, step, :, None] * a) * h + dt[:, step, :, None] * b_ssm[:, step, None, :] * u[:, step, :, None]
        ys.append((h * c_ssm[:, step, None, :]).sum(-1) + w["D"] * u[:, step])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ w["out_proj.weight"].T


def patchify(x, sd, name):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=P).flatten(2).transpose(1, 2)


def unpatchify(tokens, h, w):
    batch = tokens.shape[0]
    out = tokens.new_zeros(batch, C, h * P, w * P)
    for a in range(h):
        for b in range(w):
            for pi in range(P):
                for pj in range(P):
                    out[:, :, a * P + pi, b * P + pj] = tokens[:, a * w + b, (pi * P + pj) * C:(pi * P + pj + 1) * C]
    return out


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def zigzag_paths(n):
    """The 8 zigzag paths of the ZigMa paper (Hu et al., 2024), corner by corner, row-snake then column-snake."""
    paths = []
    for r0, c0 in [(0, 0), (0, n - 1), (n - 1, 0), (n - 1, n - 1)]:
        dr, dc = (1 if r0 == 0 else -1), (1 if c0 == 0 else -1)
        rows = [(r0 + dr * i) * n + c0 + dc * (j if i % 2 == 0 else n - 1 - j) for i in range(n) for j in range(n)]
        cols = [(r0 + dr * (i if j % 2 == 0 else n - 1 - i)) * n + c0 + dc * j for j in range(n) for i in range(n)]
        paths += [rows, cols]
    return paths


def zigma_reference(sd, x, t01, y, depth):
    """Official ZigMa (CompVis/zigma model_zigma.py, evaluation mode): t01 in [0, 1]."""
    h_grid = x.shape[-1] // P
    tokens = patchify(x, sd, "x_embedder.proj") + sd["pos_embed"]
    t_emb = linear(F.silu(linear(sinusoid(1000 * t01, 256), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    paths = zigzag_paths(h_grid)
    h, r = tokens, None
    for i in range(depth):
        r = h if i == 0 else r + h
        n = rms_norm(r, sd[f"blocks.{i}.norm.weight"])
        shift, scale, gate = linear(F.silu(c), sd, f"blocks.{i}.adaLN_modulation.1").chunk(3, dim=1)
        path = torch.tensor(paths[i % 8])
        m_path = mamba(sd, f"blocks.{i}.mixer.", modulate(n, shift, scale)[:, path])
        m = torch.empty_like(m_path)
        m[:, path] = m_path
        h = n + gate[:, None] * m
    z = rms_norm(r + h, sd["norm_f.weight"])
    z = F.layer_norm(z, (z.shape[-1],), eps=1e-6)
    return unpatchify(linear(z, sd, "final_layer.linear"), h_grid, h_grid)


def dim_patterns(rows, cols):
    raster = list(range(rows * cols))
    column = [r * cols + c for c in range(cols) for r in range(rows)]
    return [raster, raster[::-1], column, column[::-1]]


def dim_scans_reference(depth):
    """The official DiM (mamba_2d.py): the pattern index of each block."""
    m = 1 + (depth - 1) // 2
    k = [0]
    for i in range(1, depth):
        if i == depth - 1:
            k.append(0)
        elif i < m:
            k.append(i % 4)
        else:
            k.append((k[-1] - 1) % 4)
    return k


def dim_reference(sd, x, t, y, depth, pad_layout="lateral"):
    """Official DiM (tyshiwo1/DiM-DiffusionMamba mamba_2d.py and adapter_attn4mamba.py). ``pad_layout``: the
    padding of the ImageNet-256 configs ("lateral": pad i - h in the padding rows, else j - w), or of the
    ImageNet-512 fine-tune ("rho_pad", configs/imagenet512_H_DiM_ft.py there: the padding cells, counted in
    raster order, take the pad tokens 0, 1, 2, 0, 1, 2, ...)."""
    d = sd["pos_embed.proj.weight"].shape[0]
    g = x.shape[-1] // P
    tau = sinusoid(t, d)
    kappa = sd["label_emb.weight"][y]
    emb = F.silu(linear(sinusoid(t, 256), sd, "adaln_single.emb.timestep_embedder.linear_1"))
    c = linear(emb, sd, "adaln_single.emb.timestep_embedder.linear_2")
    c = c + sd["adaln_single.emb.class_embedder.embedding_table.weight"][y]
    mod = linear(F.silu(c), sd, "adaln_single.linear").view(-1, 3, d)
    s = torch.cat([tau[:, None], kappa[:, None], patchify(x, sd, "pos_embed.proj")], dim=1) + sd["additional_embed"]
    grid = s[:, 2:].transpose(1, 2).reshape(-1, d, g, g)
    grid = F.conv2d(grid, sd["a4m_adapter.first_smoother.weight"], sd["a4m_adapter.first_smoother.bias"],
                    padding=1, groups=d)
    pad = sd["a4m_adapter.pad_token"]  # [1, D, 3]
    cells, padding_cells = [], 0
    for i in range(g + 3):
        for j in range(g + 3):
            if i < g and j < g:
                cells.append(grid[:, :, i, j])
                continue
            if pad_layout == "rho_pad":
                k = padding_cells % 3
            else:
                k = i - g if i >= g else j - g
            padding_cells += 1
            cells.append(pad[:, :, k].expand(x.shape[0], -1))
    learned = sd["a4m_adapter.pad_token_dec_split"].expand(x.shape[0], -1, -1)
    s = torch.cat([s[:, :2], learned, torch.stack(cells, dim=1)], dim=1)
    patterns = dim_patterns(g + 3, g + 3)
    scans = dim_scans_reference(depth)
    half = (depth - 1) // 2
    stack = []
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        if i >= depth - half:
            skip = stack.pop()
            if f"{b}.skip_linear.weight" in sd:
                s = linear(torch.cat([s, skip], dim=-1), sd, f"{b}.skip_linear")
            else:
                s = linear(s, sd, f"{b}.skip_linear.0") + linear(skip, sd, f"{b}.skip_linear.1")
        order = torch.tensor(list(range(5)) + [5 + q for q in patterns[scans[i]]])
        shift, scale, gate = (sd[f"{b}.scale_shift_table"][None] + mod).unbind(1)
        n = rms_norm(s, sd[f"{b}.norm1.norm.weight"])
        m_order = mamba(sd, f"{b}.attn1.", modulate(n, shift, scale)[:, order])
        m = torch.empty_like(m_order)
        m[:, order] = m_order
        s = s + (1 + gate[:, None]) * m
        if 1 <= i <= half:
            stack.append(s)
    grid = s[:, 5:].reshape(-1, g + 3, g + 3, d)[:, :g, :g].permute(0, 3, 1, 2)
    grid = F.conv2d(grid, sd["a4m_adapter.last_smoother.weight"], sd["a4m_adapter.last_smoother.bias"],
                    padding=1, groups=d)
    z = rms_norm(grid.flatten(2).transpose(1, 2), sd["norm_out.norm.weight"])
    shift, scale = linear(F.silu(tau + kappa), sd, "proj_out_1").chunk(2, dim=1)
    return unpatchify(linear(modulate(z, shift, scale), sd, "proj_out_2"), g, g)


def in_reference_dtype(state: dict) -> dict:
    return {k: v.to(REFERENCE_DTYPE) for k, v in state.items()}


def inputs(size=16, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, C, size, size, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, CLASSES, (batch,), generator=g))


# ----------------------------------------------------------------------------------------------------


def test_example_layouts_have_the_documented_parameter_counts():
    assert sum(math.prod(s) for s in dim_layout(64, 9, 16).values()) == 378_832
    assert sum(math.prod(s) for s in zigma_layout(64, 9, 16).values()) == 434_192


def test_dim_scans_reference_matches_the_documented_example():
    assert dim_scans_reference(9) == [0, 1, 2, 3, 0, 3, 2, 1, 0]
    scans = dim_scans_reference(49)
    assert scans[25] == 3 and scans[48] == 0


@pytest.mark.parametrize("width, depth, size", [(64, 9, 16), (544, 3, 4)])  # 544 > 512: split skip fusion
def test_dim_load_official_reproduces_the_official_forward(width, depth, size):
    official = random_state(dim_layout(width, depth, size))
    model = load_official("DiM", official).eval().to(REFERENCE_DTYPE)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in official.values())
    x, t01, y = inputs(size)
    x = x.to(REFERENCE_DTYPE)
    t = (t01 * 1000).round()  # DiM takes the official timestep as it is
    y[0] = CLASSES  # the null class
    with torch.no_grad():
        ours = model(x, t, y)
        reference = dim_reference(in_reference_dtype(official), x, t, y, depth)
    assert ours.shape == reference.shape == (2, C, size, size)
    assert ours.dtype == reference.dtype == REFERENCE_DTYPE and reference.abs().mean() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=PARITY_TOLERANCE)


def test_zigma_load_official_reproduces_the_official_forward():
    official = random_state(zigma_layout(64, 9, 16))
    model = load_official("ZigMa", official).eval().to(REFERENCE_DTYPE)
    assert sum(p.numel() for p in model.parameters()) == 434_192
    x, t01, y = inputs()
    x = x.to(REFERENCE_DTYPE)
    with torch.no_grad():
        ours = model(x, 1000 * t01, y)  # our timestep scale: 1000 * the official t
        reference = zigma_reference(in_reference_dtype(official), x, t01, y, 9)
    assert ours.dtype == reference.dtype == REFERENCE_DTYPE and reference.abs().mean() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=PARITY_TOLERANCE)


@pytest.mark.parametrize("arch, layout", [("DiM", dim_layout), ("ZigMa", zigma_layout)])
def test_converted_state_dict_has_the_official_names_and_shapes(arch, layout):
    """Our freshly built model, exported, has exactly the official table's keys and shapes."""
    model = create_model(arch, input_size=16, patch_size=2, hidden_size=64, depth=9, num_classes=CLASSES,
                         class_dropout_prob=0.1 if arch == "DiM" else 0.0)
    exported = to_official(arch, model.state_dict())
    assert {k: tuple(v.shape) for k, v in exported.items()} == layout(64, 9, 16)
    back = to_ours(arch, exported)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_released_nesting_is_unwrapped_and_the_ema_preferred():
    official = random_state(zigma_layout(64, 9, 16))
    raw = {k: torch.zeros_like(v) for k, v in official.items()}
    nested = {"model": {f"module.{k}": v for k, v in raw.items()}, "ema": {f"module.{k}": v for k, v in official.items()},
              "opt": {"lr": 1.0}, "step": 7}
    assert unwrap_state_dict(nested).keys() == official.keys()
    model = load_official("ZigMa", nested)
    assert torch.equal(model.state_dict()["norm_f.weight"], official["norm_f.weight"])
    assert unwrap_state_dict({"state_dict": official}).keys() == official.keys()


def test_mismatches_are_listed_in_one_error():
    official = random_state(dim_layout(64, 9, 16))
    del official["norm_out.norm.weight"]
    official["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra.weight"):
        load_official("DiM", official)
    del official["extra.weight"]
    with pytest.raises(ValueError, match=r"final_layer\.norm_final\.weight missing.*pos_embed: checkpoint"):
        load_official("DiM", official, input_size=32)
    with pytest.raises(ValueError, match="unknown official architecture"):
        load_official("Mamba", official)


def test_a_zigma_null_class_row_loads_when_label_dropout_is_asked_for():
    official = random_state(zigma_layout(64, 9, 16, classes=CLASSES + 1))
    model = load_official("ZigMa", official, class_dropout_prob=0.1)
    assert model.num_classes == CLASSES
    unconditional = random_state(zigma_layout(64, 9, 16, classes=0))
    model = load_official("ZigMa", unconditional)
    assert model.num_classes == 0 and model.y_embedder is None


# ----------------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py: a converted official DiM samples with the official conventions and
# initialises a fine-tuning run


def convert_with_the_tool(arch: str, released, folder):
    """Save ``released`` as an official checkpoint file, convert it with tools/convert_checkpoint.py for the
    digits config; returns the converted run dir."""
    torch.save(released, folder / "official.pth")
    out = folder / "converted" / "checkpoints" / "step-0000000.pt"
    done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--arch", arch, str(folder / "official.pth"),
                           str(out), "--config", "configs/quickstart.py", "log.tensorboard=false"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out.parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random official DiM for the digits (1x16x16, 10 classes), nested as a released file, converted."""
    official = random_state(dim_layout(32, 3, 16, channels=1))
    released = {"ema": {f"module.{k}": v for k, v in official.items()}}
    return official, convert_with_the_tool("dim", released, tmp_path_factory.mktemp("convert"))


def test_converted_checkpoint_samples_with_the_official_conventions(converted, tmp_path):
    official, run_dir = converted
    model, diffusion, cfg = sampling.load_for_sampling(run_dir, torch.device("cpu"))
    reference = load_official("DiM", official)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert isinstance(diffusion, GaussianDiffusion)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # DDPM's "scaled linear"
    torch.testing.assert_close(diffusion.betas, betas)
    assert diffusion.model_time(torch.tensor([0, 999])).tolist() == [1.0, 1000.0]  # DiM is fed n = 1..1000
    assert diffusion.respace(50).model_time(torch.tensor([49])).item() == 1000.0
    assert (cfg["sample"]["sampler"], cfg["sample"]["steps"], cfg["sample"]["cfg_scale"]) == ("dpm_solver", 50, 1.4)
    out = sampling.sample_grid_file(run_dir, tmp_path / "grid.png", [0, 1], per_class=1, sample_overrides={"steps": 2})
    assert out.is_file()


def test_converted_checkpoint_initialises_fine_tuning(converted, tmp_path):
    official, run_dir = converted
    tiny = ["model.name=DiM", "model.learn_sigma=false", "routing.routes=[(1, 1, 0.5)]", "train.batch_size=4",
            "train.steps=1", "log.tensorboard=false", "log.progress=false", "eval.num_samples=0",
            "sample.steps=2", "sample.grid_classes=[0]", "sample.grid_per_class=1", "train.ckpt_every=0"]
    size = "model.kwargs={'hidden_size': 32, 'depth': 3, 'patch_size': 2}"
    cfg = load_config("configs/quickstart.py", [*tiny, size, f"train.init_from={run_dir}", f"train.run_dir={tmp_path / 'a'}"])
    cfg["optim"].update(lr=1e-12, min_lr=0.0)  # the one step leaves the weights as they were loaded (AdamW moves each by ~lr)
    summary = train(cfg)
    weights = torch.load(summary["checkpoint"], weights_only=True)["model"]
    reference = load_official("DiM", official).state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-9)
    wrong = "model.kwargs={'hidden_size': 32, 'depth': 5, 'patch_size': 2}"
    cfg = load_config("configs/quickstart.py", [*tiny, wrong, f"train.init_from={run_dir}", f"train.run_dir={tmp_path / 'b'}"])
    with pytest.raises(CheckpointError, match="train.init_from"):
        train(cfg)


# An official ZigMa image model is unconditional: tools/sample.py samples it without labels, and it
# initialises a class-conditional fine-tuning run whose label table starts fresh


@pytest.fixture(scope="module")
def converted_zigma(tmp_path_factory):
    """A random unconditional official ZigMa for the digits (1x16x16), converted."""
    official = random_state(zigma_layout(32, 3, 16, classes=0, channels=1))
    return official, convert_with_the_tool("zigma", official, tmp_path_factory.mktemp("convert_zigma"))


def sample_tool(*args):
    return subprocess.run([sys.executable, "tools/sample.py", *map(str, args), "--steps", "1", "--batch-size", "3"],
                          capture_output=True, text=True, timeout=300)


def test_unconditional_zigma_samples_without_labels(converted_zigma, tmp_path):
    _, run_dir = converted_zigma
    done = sample_tool(run_dir, "--num-images", 5, "--out", tmp_path / "s.npz")
    assert done.returncode == 0, done.stderr[-2000:]
    data = np.load(tmp_path / "s.npz")
    assert "arr_1" not in data and data["arr_0"].shape == (5, 16, 16, 3)  # an ADM batch with no labels
    done = sample_tool(run_dir, "--num-images", 6, "--per-class", 3, "--out", tmp_path / "grid.png")
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(tmp_path / "grid.png").size == (3 * 66 + 2, 2 * 66 + 2)  # 6 images in rows of 3, 64 px + 2 px gaps
    for bad, message in ((["--classes", 0], "unconditional"), (["--num-images", 2, "--cfg-scale", 2], "--cfg-scale 1")):
        done = sample_tool(run_dir, *bad, "--out", tmp_path / "bad.png")
        assert done.returncode != 0 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "bad.png").exists()


def test_unconditional_zigma_initialises_a_class_conditional_run(converted_zigma, tmp_path, capsys):
    official, run_dir = converted_zigma
    tiny = ["model.name=ZigMa", "model.learn_sigma=false", "model.kwargs={'hidden_size': 32, 'depth': 3, 'patch_size': 2}",
            "routing.routes=[(1, 1, 0.5)]", "train.batch_size=4", "train.steps=1", "log.tensorboard=false",
            "log.progress=false", "eval.num_samples=0", "sample.steps=2", "sample.grid_classes=[0]",
            "sample.grid_per_class=1", "train.ckpt_every=0", f"train.init_from={run_dir}", f"train.run_dir={tmp_path}"]
    cfg = load_config("configs/quickstart.py", tiny)
    cfg["optim"].update(lr=1e-12, min_lr=0.0)
    weights = torch.load(train(cfg)["checkpoint"], weights_only=True)["model"]
    assert "unconditional" in capsys.readouterr().out
    ours = to_official("ZigMa", weights)
    assert ours["y_embedder.embedding_table.weight"].shape == (CLASSES + 1, 32)  # the digits' classes and a null row
    for key, value in official.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-9)
