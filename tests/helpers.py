"""Test doubles and hand-derived counts shared by the backbone tests."""


import torch
import torch.nn as nn


class Probe(nn.Module):
    """Stands in for Mamba: records the tokens it reads, in the order it reads them; outputs zeros."""

    def __init__(self, d_model, **kwargs):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros_like(x)


def model_inputs(batch=2, size=8, seed=0, channels=4, num_classes=10):
    """Seeded x [B, C, size, size], t [B] in [0, 1000), y [B] for a backbone's forward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def randomize_zero_parameters(model, seed=0):
    """Give the zero-initialised parameters (adaLN, gates, final layer) random values, so that every
    block and the output depend on their inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make_identity_blocks(model):
    """Every block passes its tokens on unchanged around a probe: no norm, zero modulation, skips pass
    x through. (ZigMa's blocks then double the stream each block: r = r + h with h = r.)"""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "scale_shift_table" in name:
                p.zero_()
    for block in model.blocks:
        block.norm = nn.Identity()
        skip_linear = getattr(block, "skip_linear", None)
        if skip_linear is not None:
            d = block.scale_shift_table.shape[-1]
            with torch.no_grad():  # the one-Linear fusion of widths up to 512
                skip_linear.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
                skip_linear.bias.zero_()


def capture_passes(model):
    """Record every RoutingPass the model's router begins (for the kept sets)."""
    passes = []
    begin = model.router.begin

    def spy(*args, **kwargs):
        passes.append(begin(*args, **kwargs))
        return passes[-1]

    model.router.begin = spy
    return passes


def save_tiny_vae(path):
    """A randomly initialised diffusers AutoencoderKL (16x16 images -> 4x4x4 latents) saved to ``path``."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return str(path)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_tool(*args, fault=None, timeout=300, env=None):
    """A command-line tool of tools/ as a user runs it (optionally under a tests/faults.py fault), from the
    repository root on one thread; returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    prefix = [str(ROOT / "tests" / "faults.py"), fault] if fault else []
    command = [sys.executable, *prefix, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_fails_in_one_line(done, code, *needles, lines=1):
    """Exit ``code``, at most ``lines`` error lines on stderr and no traceback, each needle in them."""
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and len(errors) <= lines, done.stderr[-3000:]
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)
