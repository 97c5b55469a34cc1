"""ZigMa (Hu et al., "ZigMa: A DiT-style Zigzag Mamba Diffusion Model") with scan-consistent TREAD
token routing.

Patch embedding + fixed 2D sin-cos position embedding -> ``depth`` blocks: RMSNorm -> adaLN
shift/scale/gate (per block, SiLU -> Linear(D, 3D), zero-initialised) -> one Mamba reading the
block's zigzag path (block i reads path i mod num_paths, :func:`ssm_tread.scans.zigma_schedule`) ->
gated residual; DiT's final adaLN layer; unpatchify. Condition: timestep embedding + class embedding.

While a route is in flight, every routed block reads the survivors in its own zigzag path
restricted to them (``scan_consistent=False``: in their random selection order, the ablation).

Shapes: B batch, C input channels, H x W input, p patch size, h x w = H/p x W/p patch grid,
N = h*w tokens, K tokens inside a route, D hidden size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssm_tread.models.layers import (
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    adaln_modulation,
    check_conditioning,
    init_dit_style,
    modulate,
    route_pixel_masks,
    sincos_2d,
    unpatchify,
)
from ssm_tread.models.mamba import Mamba
from ssm_tread.models.ssm_block import (
    MixerFactory,
    attach_mixers,
    mix_in_scan_order,
    scan_table,
)
from ssm_tread.routing import RouteSpec, ScanIndex, TokenRouter
from ssm_tread.scans import scan_order, zigma_schedule

ZIGMA_CONFIGS: dict[str, dict] = {
    f"ZigMa-{size}/{patch}": dict(hidden_size=width, depth=depth, patch_size=patch)
    for size, (width, depth) in {
        "S": (368, 24),
        "B": (768, 24),
        "M": (768, 48),
        "L": (1024, 48),
        "H": (1536, 48),
    }.items()
    for patch in (1, 2)
}


class ZigMaBlock(nn.Module):
    """RMSNorm -> adaLN shift/scale -> Mamba along the block's zigzag path -> gated residual.

    ``mixer`` is attached by the model after initialisation (see :func:`attach_mixers`).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.adaLN_modulation = adaln_modulation(hidden_size, 3)

    def forward(self, x: torch.Tensor, c: torch.Tensor, scan: ScanIndex) -> torch.Tensor:
        # x [B, N or K, D], c [B, D]
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)  # [B, D] each
        h = mix_in_scan_order(self.mixer, modulate(self.norm(x), shift, scale), scan)
        return x + gate.unsqueeze(1) * h


class ZigMa(nn.Module):
    """Class-conditional zigzag Mamba over a [B, C, H, W] latent, with TREAD routes.

    ``routes``: list of ``Route`` / ``{"start", "end", "ratio"}`` (see :mod:`ssm_tread.routing`);
    ``scan_consistent=False`` reads the survivors in their random selection order (ablation).
    ``num_paths``: blocks cycle through the first ``num_paths`` of the 8 zigzag paths.
    ``mixer_cls(hidden_size, d_state=, d_conv=, expand=)`` builds each block's sequence mixer
    (default: :class:`~ssm_tread.models.mamba.Mamba`; tests swap in probes).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 24,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        num_paths: int = 8,
        routes: list[RouteSpec] | None = None,
        scan_consistent: bool = True,
        mixer_cls: MixerFactory = Mamba,
    ):
        super().__init__()
        schedule = zigma_schedule(depth, num_paths)  # raises for num_paths outside 1..8
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.schedule = schedule

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # fixed sin-cos embedding, stored (like DiT) as a parameter that is not trained
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([ZigMaBlock(hidden_size) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.router = TokenRouter(routes, depth, scan_consistent)

        orders, self.block_scan = scan_table(schedule, lambda name: scan_order(name, *self.grid_size))
        self.register_buffer("scan_orders", orders, persistent=False)  # [distinct paths, N]
        # every grid token, raster order (the sequence is the grid)
        self.register_buffer("grid_positions", torch.arange(self.x_embedder.num_patches), persistent=False)

        self._init_weights()
        attach_mixers(
            self.blocks, mixer_cls, hidden_size, d_state=d_state, d_conv=d_conv, expand=expand
        )

    def _init_weights(self) -> None:
        """DiT-style init of everything but the mixers, which are attached afterwards with their own init."""
        init_dit_style(self)
        pos_embed = sincos_2d(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_masks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W], t [B] float timesteps, y [B] long labels -> [B, out_channels, H, W].

        With ``return_masks`` also returns BoolTensor [R, B, H, W]: True where the pixel's token went
        through route r of this pass (R = 0 when the pass did not route).
        """
        check_conditioning(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]

        routing = self.router.begin(training=self.training)
        for i, block in enumerate(self.blocks):
            x = routing.enter(i, x)  # at a route start: [B, N, D] -> kept tokens [B, K, D]
            x = block(x, c, routing.scan(self.scan_orders[self.block_scan[i]]))
            x = routing.exit(i, x)  # at a route end: back to [B, N, D]

        x = self.final_layer(x, c)  # [B, N, p*p*out_channels]
        x = unpatchify(x, self.grid_size, self.patch_size, self.out_channels)  # [B, out_channels, H, W]
        if not return_masks:
            return x
        return x, route_pixel_masks(routing, self.grid_positions, self.grid_size, self.patch_size, x.shape[0])
