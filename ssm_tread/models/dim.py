"""DiM (Teng et al., "DiM: Diffusion Mamba for Efficient High-Resolution Image Synthesis") with
scan-consistent TREAD token routing.

This is the official DiM (github.com/tyshiwo1/DiM-DiffusionMamba at commit 292b228, ``Mamba2DModel``
with the ImageNet configs): same forward pass, same initialisation, the same parameters
(:func:`ssm_tread.models.load_official` loads its checkpoints key for key). Forward:

1. Patchify (p x p conv) -> tokens [B, n, D]. The time token tau = sinusoid_D(t) (the raw sinusoid,
   no MLP) and the class token kappa = ``class_tokens[y]`` (a table of its own). A learned position
   embedding of [tau, kappa, patches] (zero-initialised) is added; then the patches go through a
   depthwise 3x3 conv (``in_conv``).
2. The sequence ``[tau, kappa, 3 learned tokens, padded grid]`` (L = 5 + (h+3)(w+3) tokens), where
   the padded grid is the h x w patch grid with 3 padding tokens appended to every row and 3 padding
   rows below it, in raster order. Which padding token fills a cell (i, j) outside the grid is set by
   ``pad_layout``, as in the official configs' ``pad_token_schedules``: "lateral" (the ImageNet-256
   configs) gives token i - h if i >= h, else j - w (the corner cells follow the row rule); "rho_pad"
   (the ImageNet-512 fine-tune, configs/imagenet512_H_DiM_ft.py) numbers the padding cells in raster
   order and gives the k-th one token k mod 3. The two agree on the padding columns of the grid rows.
3. ``depth`` blocks (no MLP): [long-skip fusion] -> RMSNorm -> adaLN-single shift/scale (one shared
   ``Linear(D, 3D)`` of c = t_embedder(t) + y_embedder(y), plus the block's learned [3, D] table) ->
   one unidirectional Mamba reading the block's scan order -> ``s + (1 + gate) * mixer``.
4. Drop the prefix and the padding -> depthwise 3x3 conv (``out_conv``) -> RMSNorm with weight ->
   shift/scale from Linear(SiLU(tau + kappa)) -> Linear -> unpatchify.

Long skips (U-ViT style), with m = (depth - 1) / 2: blocks 1..m store their output (block 0 stores
nothing) and blocks m+1..depth-1 fuse them last in, first out, so block m+1 fuses block m and the last
block fuses block 1. The fusion is ``W [s; skip] + b``: one ``Linear(2D, D)`` up to width 512, and above (every
published config) two ``Linear(D, D)`` (``skip_linear.0`` on the stream, ``skip_linear.1`` on the
skip) whose biases add, as in the official code.

Scan orders (:func:`ssm_tread.scans.dim_scans`: raster, its reverse, column-major, its reverse) are
defined over the whole sequence: the 5 prefix tokens first in every scan (reverse scans too, so the
condition is read before the image), then the padded grid in the block's direction.

Initialisation (the official one, which is not adaLN-Zero): every Linear bias 0 (except the mixers'
dt bias), Embeddings and the timestep MLP's weights N(0, 0.02), mixer ``out_proj`` kaiming-uniform /
sqrt(depth), the per-block tables N(0, 1) / sqrt(D), the learned and padding tokens N(0, 0.02), the
position embedding 0; every other weight keeps PyTorch's default (so the modulation is non-zero from
the start and the untrained model does not output zero).

What is ours, not the official model's:

- TREAD routing through the shared :class:`~ssm_tread.routing.TokenRouter`. Only image grid tokens are
  routable; the prefix and padding tokens go through every block and keep their places in every
  restricted order. Skips are stored with their routing tag; a skip that crosses a route boundary is
  brought to the fusing block's token set with ``routing.align`` (scattered over the route-start
  state, or gathered at the kept tokens). Between blocks the tokens lie as the routing pass holds
  them (the full sequence in sequence order; inside a route the kept tokens in selection order) and
  each mixer permutes to its scan and back, so a skip and the stream it is fused with always line up.
- ``class_dropout_prob``: in training a label is replaced by the null class ``num_classes`` with this
  probability, in both tables at once (the official code does this in its data pipeline). Both
  tables always have the null row, as in the official model; ``y = num_classes`` is the
  unconditional input of classifier-free guidance (:class:`ssm_tread.diffusion.Guidance`).
- ``learn_sigma=True`` doubles the output channels (ADM's learned variance); off by default, as in
  every official config (DiM predicts noise with a fixed variance). With it off the output head is
  the official one.

Timestep convention: the model embeds ``t`` as given, like the official one. The official checkpoints
were trained with integer n = 1..1000 on DDPM's scaled-linear schedule (n is this project's DDPM step
index + 1) and are sampled with DPM-Solver at t = 1000 * t_continuous.

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
    modulate,
    unpatchify,
    with_route_masks,
)
from ssm_tread.models.mamba import Mamba
from ssm_tread.models.ssm_common import MixerFactory, init_mamba_backbone, mix_in_scan_order, scan_table
from ssm_tread.routing import RouteSpec, ScanIndex, TokenRouter
from ssm_tread.scans import dim_scans, scan_order

DIM_CONFIGS: dict[str, dict] = {
    # ours, not official (the official DiM has L and H only): DiT-S's and DiT-B's widths and 25 blocks (ZigMa-S's
    # and ZigMa-B's 24, plus one: the long skips need an odd depth); 29.5M and 114.0M parameters with 1000
    # classes, the second about the 111M of the Mamba model in the TREAD paper's study
    "DiM-S/2": dict(hidden_size=384, depth=25, patch_size=2),
    "DiM-B/2": dict(hidden_size=768, depth=25, patch_size=2),
    # the official ImageNet-256 configs
    "DiM-L/2": dict(hidden_size=1024, depth=49, patch_size=2),
    "DiM-H/2": dict(hidden_size=1536, depth=49, patch_size=2),
}

NUM_LEARNED = 3  # learned tokens after the time and class tokens
NUM_PREFIX = 2 + NUM_LEARNED  # time token, class token, learned tokens
NUM_PAD = 3  # padding tokens at the end of every row, and padding rows below the grid
SPLIT_SKIP_WIDTH = 512  # above this width the skip fusion is two Linear(D, D) (the official layout)
PAD_LAYOUTS = ("lateral", "rho_pad")  # which padding token fills which cell (module docstring)


def long_skips(depth: int) -> dict[int, int]:
    """{fusing block: the block whose output it fuses}: blocks 1..m store, blocks m+1..depth-1 fuse them last in,
    first out (m = (depth - 1) / 2; module docstring)."""
    return {depth - k: k for k in range(1, (depth - 1) // 2 + 1)}


class DiMBlock(nn.Module):
    """[skip fusion] -> RMSNorm -> adaLN-single shift/scale -> Mamba in the block's scan order ->
    ``s + (1 + gate) * mixer``."""

    def __init__(self, hidden_size: int, skip: bool, mixer_cls: MixerFactory, **mixer_kwargs):
        super().__init__()
        if not skip:
            self.skip_linear = None
        elif hidden_size > SPLIT_SKIP_WIDTH:  # [0]: the stream, [1]: the skip
            self.skip_linear = nn.ModuleList([nn.Linear(hidden_size, hidden_size) for _ in range(2)])
        else:
            self.skip_linear = nn.Linear(2 * hidden_size, hidden_size)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.scale_shift_table = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)  # shift, scale, gate
        self.mixer = mixer_cls(hidden_size, **mixer_kwargs)

    def fuse(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """W [x; skip] + b: x, skip [B, L or K, D] -> [B, L or K, D]."""
        if isinstance(self.skip_linear, nn.ModuleList):
            return self.skip_linear[0](x) + self.skip_linear[1](skip)
        return self.skip_linear(torch.cat([x, skip], dim=-1))

    def forward(
        self, x: torch.Tensor, modulation: torch.Tensor, scan: ScanIndex, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x [B, L or K, D]; modulation [B, 3, D] (shared adaLN-single); skip: a long skip like x, or None
        if self.skip_linear is not None:
            x = self.fuse(x, skip)
        shift, scale, gate = (self.scale_shift_table + modulation).unbind(1)  # [B, D] each
        h = mix_in_scan_order(self.mixer, modulate(self.norm(x), shift, scale), scan)
        return x + (1 + gate.unsqueeze(1)) * h


class DiM(nn.Module):
    """Class-conditional Diffusion Mamba over a [B, C, H, W] latent, with TREAD routes (module docstring).

    ``routes``: list of ``Route`` / ``{"start", "end", "ratio"}`` (see :mod:`ssm_tread.routing`);
    ``scan_consistent=False`` reads the survivors in their random selection order (ablation).
    ``pad_layout``: which padding token fills which cell, "lateral" or "rho_pad" (module docstring).
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
        learn_sigma: bool = False,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        pad_layout: str = "lateral",
        routes: list[RouteSpec] | None = None,
        scan_consistent: bool = True,
        mixer_cls: MixerFactory = Mamba,
    ):
        super().__init__()
        if pad_layout not in PAD_LAYOUTS:
            raise ValueError(f"unknown pad_layout {pad_layout!r}; choose one of {', '.join(PAD_LAYOUTS)}")
        scans = dim_scans(depth)  # raises for an even depth
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.scans = scans  # the scan order name of each block

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        h, w = self.grid_size
        self.padded_size = (h + NUM_PAD, w + NUM_PAD)
        padded_h, padded_w = self.padded_size
        self.seq_len = NUM_PREFIX + padded_h * padded_w
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + h * w, hidden_size))  # of [tau, kappa, patches]
        self.in_conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, null_class=True)
        self.class_tokens = nn.Embedding(num_classes + 1, hidden_size)  # the class token's own table
        self.learned_tokens = nn.Parameter(torch.randn(NUM_LEARNED, hidden_size) * 0.02)
        self.pad_tokens = nn.Parameter(torch.randn(NUM_PAD, hidden_size) * 0.02)  # by distance past the grid edge
        self.adaLN_modulation = adaln_modulation(hidden_size, 3)  # adaLN-single, shared by all blocks
        self.long_skips = long_skips(depth)
        mixer_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.blocks = nn.ModuleList(
            [DiMBlock(hidden_size, i in self.long_skips, mixer_cls, **mixer_kwargs) for i in range(depth)]
        )
        self.out_conv = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=nn.RMSNorm(hidden_size, eps=1e-5))
        self.router = TokenRouter(routes, depth, scan_consistent)

        rows = torch.arange(padded_h).unsqueeze(1)  # [h+3, 1]
        cols = torch.arange(padded_w).unsqueeze(0)  # [1, w+3]
        # sequence position of every grid token, raster order over the h x w grid: [h*w]
        grid_positions = NUM_PREFIX + (rows[:h] * padded_w + cols[:, :w]).flatten()
        self.register_buffer("grid_positions", grid_positions, persistent=False)
        # which padding token fills each padded-grid cell (image cells are overwritten): [(h+3)*(w+3)]
        if pad_layout == "lateral":
            pad_index = torch.where(rows >= h, rows - h, (cols - w).clamp(min=0).expand(padded_h, -1))
        else:  # rho_pad: the padding cells, counted in raster order, cycle through the padding tokens
            is_pad = ((rows >= h) | (cols >= w)).flatten()
            pad_index = torch.where(is_pad, (is_pad.cumsum(0) - 1) % NUM_PAD, 0)
        self.register_buffer("pad_index", pad_index.flatten(), persistent=False)
        orders, self.block_scan = scan_table(scans, self.sequence_order)
        self.register_buffer("scan_orders", orders, persistent=False)  # [distinct orders, L]

        self._init_weights()

    def sequence_order(self, name: str) -> torch.Tensor:
        """Scan ``name`` over the whole sequence: the prefix first, then the padded grid in that scan. [L]"""
        grid = scan_order(name, *self.padded_size)  # [(h+3)*(w+3)] raster indices of the padded grid
        return torch.cat([torch.arange(NUM_PREFIX), NUM_PREFIX + grid])

    def _init_weights(self) -> None:
        """The official initialisation (module docstring); the mixers keep their own (dt bias, A_log, D)."""
        init_mamba_backbone(self, self.depth)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

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
        if self.training and self.y_embedder.dropout_prob > 0:
            y = self.y_embedder.token_drop(y)  # the null class, in both tables
        tau = TimestepEmbedder.timestep_embedding(t, self.hidden_size).to(x.dtype)  # [B, D]
        kappa = self.class_tokens(y)  # [B, D]
        c = self.t_embedder(t) + self.y_embedder(y, train=False)  # [B, D]

        tokens = torch.cat([tau.unsqueeze(1), kappa.unsqueeze(1), self.x_embedder(x)], dim=1) + self.pos_embed
        # the convs read contiguous [B, D, h, w]: on the channels-last view that rearrange gives, their
        # weights' gradients would come out channels-last, against DDP's layout contract for gradients
        patches = rearrange(tokens[:, 2:], "b (h w) d -> b d h w", h=h).contiguous()  # [B, D, h, w]
        patches = rearrange(self.in_conv(patches), "b d h w -> b (h w) d")  # [B, h*w, D]
        prefix = torch.cat([tokens[:, :2], self.learned_tokens.expand(batch, -1, -1)], dim=1)  # [B, 5, D]
        padded = self.pad_tokens[self.pad_index].expand(batch, -1, -1)  # [B, (h+3)*(w+3), D]
        x_seq = torch.cat([prefix, padded.to(prefix.dtype)], dim=1)  # [B, L, D]
        x = x_seq.index_copy(1, self.grid_positions, patches.to(x_seq.dtype))  # [B, L, D]

        modulation = rearrange(self.adaLN_modulation(c), "b (k d) -> b k d", k=3)  # [B, 3, D]
        routing = self.router.begin(routable=self.grid_positions, training=self.training)
        stored = {}  # block -> (its output [B, L or K, D], routing tag), for the block that fuses it
        for i, block in enumerate(self.blocks):
            x = routing.enter(i, x)  # at a route start: [B, L, D] -> kept tokens [B, K, D]
            skip = routing.align(*stored.pop(self.long_skips[i])) if i in self.long_skips else None
            x = block(x, modulation, routing.scan(self.scan_orders[self.block_scan[i]]), skip)
            x = routing.exit(i, x)  # at a route end: back to [B, L, D]
            if i in self.long_skips.values():
                stored[i] = (x, routing.tag())

        x = rearrange(x[:, self.grid_positions], "b (h w) d -> b d h w", h=h).contiguous()  # drop prefix, unpad
        x = rearrange(self.out_conv(x), "b d h w -> b (h w) d")  # [B, h*w, D]
        x = self.final_layer(x, tau + kappa)  # [B, h*w, p*p*out_channels]
        x = unpatchify(x, self.grid_size, self.patch_size, self.out_channels)  # [B, out_channels, H, W]
        return with_route_masks(x, routing, self.patch_size, return_masks)
