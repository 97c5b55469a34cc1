"""DiM (Teng et al., "DiM: Diffusion Mamba for Efficient High-Resolution Image Synthesis") with
scan-consistent TREAD token routing.

Patchify -> depthwise 3x3 conv -> the sequence

    [time token, class token, 3 learned tokens, padded grid]      (L = 5 + (h+3)*(w+3) tokens)

where the padded grid is the h x w patch grid with 3 learned padding tokens at the end of every row
and 3 padding rows below it, in raster order over (h+3) x (w+3); plus a learned position embedding.
Then ``depth`` Mamba blocks (no MLP): RMSNorm -> adaLN-single modulation (one shared
Linear(D, 3D) of the condition for the whole model plus a learned [3, D] table per block) -> one
unidirectional Mamba reading the block's scan order -> gated residual. U-ViT long skips: the first
depth//2 blocks store their outputs, block depth-1-k fuses block k's output (Linear over the
concatenation). Finally drop the prefix and padding -> depthwise 3x3 conv -> adaLN final layer ->
unpatchify.

Scan orders (:func:`ssm_tread.scans.dim_schedule`) are defined over the whole sequence: the 5 prefix
tokens first in every scan (reverse scans too, so the condition is read before the image), then the
padded grid in the block's direction. Only image grid tokens are routable; prefix and padding tokens
always go through every block and keep their places in every restricted order. A long skip that
crosses a route boundary is brought to the fusing block's token set with ``routing.align``.

Shapes: B batch, C input channels, H x W input, p patch size, h x w = H/p x W/p patch grid,
L sequence length, K tokens inside a route, D hidden size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

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
from ssm_tread.scans import dim_schedule, scan_order

DIM_CONFIGS: dict[str, dict] = {
    "DiM-L/2": dict(hidden_size=1024, depth=49, patch_size=2),
    "DiM-H/2": dict(hidden_size=1536, depth=49, patch_size=2),
}

NUM_LEARNED = 3  # learned tokens after the time and class tokens
NUM_PREFIX = 2 + NUM_LEARNED  # time token, class token, learned tokens
NUM_PAD = 3  # padding tokens at the end of every row, and padding rows below the grid


class DiMBlock(nn.Module):
    """[skip fusion] -> RMSNorm -> adaLN-single shift/scale -> Mamba in the block's scan order -> gated residual.

    ``mixer`` is attached by the model after initialisation (see :func:`attach_mixers`).
    """

    def __init__(self, hidden_size: int, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.scale_shift_table = nn.Parameter(torch.zeros(3, hidden_size))  # this block's shift, scale, gate

    def forward(
        self, x: torch.Tensor, modulation: torch.Tensor, scan: ScanIndex, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x [B, L or K, D]; modulation [B, 3, D] (shared adaLN-single); skip: a long skip like x, or None
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # [B, L or K, 2D] -> [B, L or K, D]
        shift, scale, gate = (self.scale_shift_table + modulation).unbind(1)  # [B, D] each
        h = mix_in_scan_order(self.mixer, modulate(self.norm(x), shift, scale), scan)
        return x + gate.unsqueeze(1) * h


class DiM(nn.Module):
    """Class-conditional Diffusion Mamba over a [B, C, H, W] latent, with TREAD routes.

    ``routes``: list of ``Route`` / ``{"start", "end", "ratio"}`` (see :mod:`ssm_tread.routing`);
    ``scan_consistent=False`` reads the survivors in their random selection order (ablation).
    ``mixer_cls(hidden_size, d_state=, d_conv=, expand=)`` builds each block's sequence mixer
    (default: :class:`~ssm_tread.models.mamba.Mamba`; tests swap in probes).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1024,
        depth: int = 49,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        routes: list[RouteSpec] | None = None,
        scan_consistent: bool = True,
        mixer_cls: MixerFactory = Mamba,
    ):
        super().__init__()
        schedule = dim_schedule(depth)  # raises for an even depth
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.depth = depth
        self.schedule = schedule

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        h, w = self.grid_size
        self.padded_size = (h + NUM_PAD, w + NUM_PAD)
        padded_h, padded_w = self.padded_size
        self.seq_len = NUM_PREFIX + padded_h * padded_w
        self.in_conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.learned_tokens = nn.Parameter(torch.zeros(NUM_LEARNED, hidden_size))
        self.pad_tokens = nn.Parameter(torch.zeros(NUM_PAD, hidden_size))  # by distance past the grid edge
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, hidden_size))
        self.adaLN_modulation = adaln_modulation(hidden_size, 3)  # adaLN-single, shared by all blocks
        self.blocks = nn.ModuleList([DiMBlock(hidden_size, skip=i > depth // 2) for i in range(depth)])
        self.out_conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.router = TokenRouter(routes, depth, scan_consistent)

        rows = torch.arange(padded_h).unsqueeze(1)  # [h+3, 1]
        cols = torch.arange(padded_w).unsqueeze(0)  # [1, w+3]
        # sequence position of every grid token, raster order over the h x w grid: [h*w]
        grid_positions = NUM_PREFIX + (rows[:h] * padded_w + cols[:, :w]).flatten()
        self.register_buffer("grid_positions", grid_positions, persistent=False)
        # which padding token fills each padded-grid cell (image cells are overwritten): [(h+3)*(w+3)]
        self.register_buffer("pad_index", torch.maximum(rows - h, cols - w).clamp(min=0).flatten(), persistent=False)
        orders, self.block_scan = scan_table(schedule, self.sequence_order)
        self.register_buffer("scan_orders", orders, persistent=False)  # [distinct orders, L]

        self._init_weights()
        attach_mixers(
            self.blocks, mixer_cls, hidden_size, d_state=d_state, d_conv=d_conv, expand=expand
        )

    def sequence_order(self, name: str) -> torch.Tensor:
        """Scan ``name`` over the whole sequence: the prefix first, then the padded grid in that scan. [L]"""
        grid = scan_order(name, *self.padded_size)  # [(h+3)*(w+3)] raster indices of the padded grid
        return torch.cat([torch.arange(NUM_PREFIX), NUM_PREFIX + grid])

    def _init_weights(self) -> None:
        """DiT-style init of everything but the mixers, which are attached afterwards with their own init.
        The adaLN-single Linear and the per-block tables start at zero (every block starts as identity)."""
        init_dit_style(self)
        nn.init.normal_(self.learned_tokens, std=0.02)
        nn.init.normal_(self.pad_tokens, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_masks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W], t [B] float timesteps, y [B] long labels -> [B, out_channels, H, W].

        With ``return_masks`` also returns BoolTensor [R, B, H, W]: True where the pixel's token went
        through route r of this pass (R = 0 when the pass did not route).
        """
        check_conditioning(x, t, y)
        batch = x.shape[0]
        h, _ = self.grid_size
        x = rearrange(self.x_embedder(x), "b (h w) d -> b d h w", h=h)  # [B, D, h, w]
        x = rearrange(self.in_conv(x), "b d h w -> b (h w) d")  # [B, h*w, D]
        t_emb = self.t_embedder(t)  # [B, D]
        y_emb = self.y_embedder(y, self.training)  # [B, D]
        c = t_emb + y_emb  # [B, D]

        prefix = torch.cat(
            [t_emb.unsqueeze(1), y_emb.unsqueeze(1), self.learned_tokens.expand(batch, -1, -1)], dim=1
        )  # [B, 5, D]
        padded = self.pad_tokens[self.pad_index].expand(batch, -1, -1)  # [B, (h+3)*(w+3), D]
        x_seq = torch.cat([prefix, padded.to(prefix.dtype)], dim=1)  # [B, L, D]
        x = x_seq.index_copy(1, self.grid_positions, x.to(x_seq.dtype)) + self.pos_embed  # [B, L, D]

        modulation = rearrange(self.adaLN_modulation(c), "b (k d) -> b k d", k=3)  # [B, 3, D]
        routing = self.router.begin(routable=self.grid_positions, training=self.training)
        skips = []  # (output [B, L or K, D], routing tag) of the first depth//2 blocks, fused LIFO
        for i, block in enumerate(self.blocks):
            x = routing.enter(i, x)  # at a route start: [B, L, D] -> kept tokens [B, K, D]
            skip = routing.align(*skips.pop()) if block.skip_linear is not None else None
            x = block(x, modulation, routing.scan(self.scan_orders[self.block_scan[i]]), skip)
            x = routing.exit(i, x)  # at a route end: back to [B, L, D]
            if i < self.depth // 2:
                skips.append((x, routing.tag()))

        x = rearrange(x[:, self.grid_positions], "b (h w) d -> b d h w", h=h)  # drop prefix, unpad: [B, D, h, w]
        x = rearrange(self.out_conv(x), "b d h w -> b (h w) d")  # [B, h*w, D]
        x = self.final_layer(x, c)  # [B, h*w, p*p*out_channels]
        x = unpatchify(x, self.grid_size, self.patch_size, self.out_channels)  # [B, out_channels, H, W]
        if not return_masks:
            return x
        return x, route_pixel_masks(routing, self.grid_positions, self.grid_size, self.patch_size, batch)
