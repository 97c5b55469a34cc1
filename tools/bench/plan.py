"""Planning table: what each preset costs at ImageNet-256 and ImageNet-512, with and without TREAD, before
anything is trained. Everything is counted on the meta device (no weights, no data, seconds for every preset):

- parameters;
- forward GMACs of one image without and with the config's TREAD routes (:func:`ssm_tread.models.count_macs`:
  linears, convolutions, attention matmuls, selective scans) and their ratio, the analytic TREAD speedup;
- activation memory per sample: the bytes autograd saves for backward in one training forward of one image
  (:func:`tools.bench.step.saved_activation_bytes`), the model in bf16. Attention is counted as a fused
  (flash) kernel keeps it, q, k, v, the output and an fp32 log-sum-exp per query
  (:class:`FlashAttentionMemory`; the meta device would otherwise take the math path and keep the N x N
  attention matrix); the selective scan as this project's torch backend keeps it (fp32 inputs, states at
  block starts), an upper bound for the mamba_ssm kernel, which keeps its bf16 inputs;
- training state per model: fp32 weights, gradients, AdamW's two moments and the EMA, 20 bytes a parameter
  (:func:`tools.bench.step.static_bytes` of a real step), sharded over the ranks by FSDP.

The memory of a step is about training state + batch per rank x activations per sample, plus the
allocator's slack and transient buffers that this count leaves out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from ssm_tread.models import count_macs, create_model
from ssm_tread.train.config import load_config, model_spec
from tools.bench.specs import RandomLatents
from tools.bench.step import saved_activation_bytes, storage_id

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# one TREAD config per preset; its routes are the ones counted, its model name and kwargs the model
PLAN_CONFIGS = ("dit_s2", "dit_b2", "dit_l2", "dit_xl2", "dim_s2", "dim_b2", "dim_l", "dim_h", "zigma_s2", "zigma_b2")
RESOLUTIONS = {256: 32, 512: 64}  # image side -> latent side (SD-VAE, 8x down)
TRAINING_BYTES_PER_PARAMETER = 4 + 4 + 8 + 4  # fp32 weights, gradients, AdamW moments, EMA


class FlashAttentionMemory(torch.autograd.Function):
    """Stands in for ``F.scaled_dot_product_attention`` in the memory count: keeps what a fused attention
    kernel keeps for backward (q, k, v, the output, the fp32 log-sum-exp of each query); never run backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)  # [B, heads, N, head_dim]
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [B, heads, N]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("FlashAttentionMemory only counts memory; it has no backward")


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    with mock.patch.object(F, "scaled_dot_product_attention", lambda q, k, v: FlashAttentionMemory.apply(q, k, v)):
        yield


def activation_bytes(model: torch.nn.Module, routed: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes autograd saves in one training forward of one image through ``model`` (on any device, the meta
    device included), the model cast to ``dtype`` in place; ``routed``: with every route of its router taken."""
    model = model.to(dtype).eval()  # eval: no label dropout; the routes are forced below
    parameter = next(model.parameters())
    side = model.input_size
    x = torch.zeros(1, model.in_channels, side, side, device=parameter.device, dtype=dtype)
    t = torch.zeros(1, device=parameter.device)
    y = torch.zeros(1, dtype=torch.long, device=parameter.device)
    exclude = {storage_id(p) for p in model.parameters()} | {storage_id(b) for b in model.buffers()}
    routing = model.router.forced() if routed else contextlib.nullcontext()
    with torch.enable_grad(), fused_attention(), routing:
        return saved_activation_bytes(lambda: model(x, t, y), exclude)


@dataclass
class PlanRow:
    config: str
    model: str
    resolution: int
    tokens: int
    routes: list
    params: int
    macs: int
    macs_tread: int
    activations: int
    activations_tread: int

    @property
    def speedup(self) -> float:
        return self.macs / self.macs_tread

    @property
    def training_state(self) -> int:
        return TRAINING_BYTES_PER_PARAMETER * self.params


def plan_row(config: str, resolution: int) -> PlanRow:
    """The planning numbers of configs/<config>_tread.py's model at ``resolution`` (256 or 512)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution}: the planning table covers {', '.join(map(str, RESOLUTIONS))}")
    cfg = load_config(CONFIGS_DIR / f"{config}_tread.py")
    name, kwargs = model_spec(cfg, RandomLatents(image_size=RESOLUTIONS[resolution]))
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    grid_h, grid_w = model.grid_size
    return PlanRow(
        config=config, model=name, resolution=resolution, tokens=grid_h * grid_w, routes=cfg["routing"]["routes"],
        params=sum(p.numel() for p in model.parameters()),
        macs=count_macs(model, routed=False), macs_tread=count_macs(model, routed=True),
        activations=activation_bytes(model, routed=False), activations_tread=activation_bytes(model, routed=True),
    )


def plan_table(rows: list[PlanRow]) -> str:
    """The Markdown planning table of docs/benchmarks.md."""
    mib, gib = 2**20, 2**30
    lines = [
        "| preset | image | tokens | TREAD route | params | GMACs fwd | GMACs fwd, TREAD | analytic speedup "
        "| activations / sample, bf16 (MiB) | with TREAD (MiB) | training state (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        route = ", ".join(f"{a} -> {b} at {ratio}" for a, b, ratio in r.routes)
        lines.append(
            f"| {r.model} | {r.resolution} | {r.tokens} | {route} | {r.params / 1e6:.1f}M | {r.macs / 1e9:.2f} "
            f"| {r.macs_tread / 1e9:.2f} | {r.speedup:.3f} | {r.activations / mib:.0f} | {r.activations_tread / mib:.0f} "
            f"| {r.training_state / gib:.1f} |"
        )
    return "\n".join(lines)
