"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with TREAD token routing.

Module and parameter names follow the reference implementation, so its checkpoints
(``DiT-XL-2-256x256.pt``) load with ``strict=True`` and give the same output. Routing goes through the
shared :class:`~ssm_tread.routing.TokenRouter`; attention does not depend on token order, so DiT needs
no scan orders.

Shapes: B batch, C input channels, H x W input, p patch size, h x w = H/p x W/p patch grid,
N = h*w tokens, D hidden size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssm_tread.models.layers import (
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    check_conditioning,
    modulate,
    sincos_2d,
    unpatchify,
    with_route_masks,
)
from ssm_tread.routing import RouteSpec, TokenRouter

# size presets of the DiT paper; each name maps to the constructor arguments that differ between sizes
DIT_CONFIGS: dict[str, dict] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in {
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
    }.items()
    for patch in (2, 4, 8)
}


class Attention(nn.Module):
    """Multi-head self-attention: qkv projection (with bias) -> scaled dot-product attention -> proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)

    def extra_macs(self, inputs: tuple, output: torch.Tensor) -> int:
        """MACs of the two attention matmuls (q @ k^T and attn @ v) for :func:`count_macs`: 2 * B * N^2 * D.
        The qkv and proj linears are counted as linears."""
        B, N, D = inputs[0].shape
        return 2 * B * N * N * D


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x += gate * attn(modulate(LN(x))); x += gate * mlp(modulate(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x [B, N, D] (N: the tokens currently in the block), c [B, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    """Class-conditional diffusion transformer over a [B, C, H, W] latent, with TREAD routes.

    ``routes``: list of ``Route`` / ``{"start", "end", "ratio"}`` (see :mod:`ssm_tread.routing`).
    ``scan_consistent`` is kept for a uniform constructor across backbones; attention ignores token order.
    ``fp32_after_route``: under autocast, run the block right after each route's end in fp32, as the
    reference TREAD code does.
    Classifier-free guidance is not a model method (the reference's ``forward_with_cfg``): samplers apply it
    through :class:`ssm_tread.diffusion.Guidance`.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        routes: list[RouteSpec] | None = None,
        scan_consistent: bool = True,
        fp32_after_route: bool = True,
    ):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.fp32_after_route = fp32_after_route

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid_size = self.x_embedder.grid_size
        num_patches = self.x_embedder.num_patches
        # fixed sin-cos embedding, stored (like the reference) as a parameter that is not trained
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.router = TokenRouter(routes, depth, scan_consistent)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference DiT initialisation: xavier-uniform linears with zero bias, the fixed sin-cos position
        embedding, N(0, 0.02) timestep MLP and label table, and zeroed adaLN modulations and final layer
        (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        pos_embed = sincos_2d(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # the patch projection like a linear: xavier-uniform on its [D, C*p*p] view
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks),
                      self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_masks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W], t [B] float timesteps, y [B] long labels -> [B, out_channels, H, W].

        With ``return_masks`` also returns BoolTensor [R, B, H, W]: True where the pixel's token went
        through route r of this pass (R = 0 when the pass did not route).
        """
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        check_conditioning(x, t, y)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]

        routing = self.router.begin(training=self.training)
        for i, block in enumerate(self.blocks):
            x = routing.enter(i, x)  # at a route start: [B, N, D] -> kept tokens [B, K, D]
            x = self._block_fp32(block, x, c) if self.fp32_after_route and routing.after_route(i) else block(x, c)
            x = routing.exit(i, x)  # at a route end: back to [B, N, D]

        x = self.final_layer(x, c)  # [B, N, p*p*out_channels]
        x = unpatchify(x, self.grid_size, self.patch_size, self.out_channels)  # [B, out_channels, H, W]
        return with_route_masks(x, routing, self.patch_size, return_masks)

    @staticmethod
    def _block_fp32(block: DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Run ``block`` outside autocast in fp32 (a plain call when autocast is off)."""
        device_type = x.device.type
        if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
            return block(x, c)
        with torch.autocast(device_type=device_type, enabled=False):
            return block(x.float(), c.float())
