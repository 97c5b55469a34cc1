"""ZigMa (Hu et al., "ZigMa: A DiT-style Zigzag Mamba Diffusion Model") with scan-consistent TREAD
token routing.

This is the official ZigMa image model (github.com/CompVis/zigma at commit 37d837b, ``ZigMa`` with
``scan_type="zigzagN8"``): same forward pass, same initialisation, the same parameters
(:func:`ssm_tread.models.load_official` loads its checkpoints key for key). Forward:

1. Patch embedding (p x p conv) [+ position embedding] -> tokens [B, N, D]; the condition
   c = t_embedder(t) [+ y_embedder(y)].
2. ``depth`` blocks over the residual pair (h, r), starting from h = tokens, r = 0. Block i:
   ``r = r + h``; ``n = RMSNorm(r)``; (shift, scale, gate) = Linear(SiLU(c)) (per block,
   zero-initialised); ``h = n + gate * Mamba(modulate(n, shift, scale))``, the Mamba reading zigzag
   path i mod num_paths (:func:`ssm_tread.scans.zigma_scans`). The gated mixer output is added to
   the *normalised* stream and the un-normalised sum r is carried separately: this is the official
   (mamba-ssm fused add-norm) residual scheme, not DiT's ``x + gate * f(x)``.
3. ``norm_f(r + h)`` (RMSNorm with weight) -> LayerNorm without affine -> Linear (no conditioning)
   -> unpatchify.

Initialisation (official): patch conv xavier-uniform, timestep MLP weights N(0, 0.02), the blocks'
adaLN Linears zero, every other Linear bias 0 (except the mixers' dt bias), Embeddings N(0, 0.02),
mixer ``out_proj`` kaiming-uniform / sqrt(depth), the output Linear's weight PyTorch's default.

Routing and the residual pair. The stream is the pair (h, r), carried between blocks as one tensor
``[h | r]`` of shape [B, N, 2D]. The shared :class:`~ssm_tread.routing.TokenRouter` therefore gathers
both halves of the kept tokens at a route start and scatters both back at the route end: a bypassed
token re-enters with the h and the r it had at the route start, exactly as if the routed blocks had
not seen it, and the next block's ``r + h`` continues its stream. Inside a route each block reads the
survivors in its own zigzag path restricted to them (``scan_consistent=False``: in their random
selection order, the ablation). Every token is routable (ZigMa has no extra tokens).

Extensions (each leaves the official function unchanged when off):

- Class conditioning. The official image models are unconditional (``num_classes=0`` here: no label
  table, y is ignored); the official class-conditional path adds ``table[y]`` (n_cls rows) to the
  timestep embedding. Classifier-free guidance needs a null class, so with ``class_dropout_prob > 0``
  the table gets one more row, ``num_classes``, that replaces a label with that probability in
  training and is the unconditional input of :class:`ssm_tread.diffusion.Guidance`. For labels
  0..n_cls-1 the forward is the official one; ``class_dropout_prob=0`` gives the official table
  (n_cls rows, the official parameter count).
- ``learn_sigma=True`` doubles the output channels (ADM's learned variance). Off by default: the
  official model predicts a velocity with ``in_channels`` outputs.
- ``drop_path``: stochastic depth as in the official code (block i drops its incoming h with rate
  linspace(0, drop_path, depth)[i-1], block 0 never, the final ``r + h`` with the full rate). The
  official default is 0.1; ours is 0, as in the DiT/SiT/TREAD protocols this project compares under.
  It acts in training only.

``pos_embed``: "learned" (the repository's image configs, use_pe=2: learned, zero-initialised; the
default), "sincos" (use_pe=1: fixed 2-D sin-cos, not trained) or "none" (use_pe=0, the constructor's
default there).

Timestep convention: the model embeds ``t`` as given. The official model takes the interpolant time
t in [0, 1] (1 = data) and multiplies it by 1000 inside, so ``model(x, 1000 * t, y)`` here equals the
official ``model(x, t, y)``; :class:`ssm_tread.diffusion.FlowMatching` feeds 1000 * t by default.

Shapes: B batch, C input channels, H x W input, p patch size, h x w = H/p x W/p patch grid,
N = h*w tokens, K tokens inside a route, D hidden size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssm_tread.models.layers import (
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
from ssm_tread.models.mamba import Mamba
from ssm_tread.models.ssm_common import MixerFactory, init_mamba_backbone, mix_in_scan_order, scan_table
from ssm_tread.routing import RouteSpec, ScanIndex, TokenRouter
from ssm_tread.scans import scan_order, zigma_scans

ZIGMA_CONFIGS: dict[str, dict] = {
    f"ZigMa-{size}/{patch}": dict(hidden_size=width, depth=depth, patch_size=patch)
    for size, (width, depth) in {
        "S": (368, 24),
        "B": (768, 24),
        "M": (768, 48),
        "L": (1024, 48),
        "H": (1536, 48),
    }.items()
    for patch in (1, 2, 4)
}
POS_EMBEDS = ("learned", "sincos", "none")


def stochastic_depth(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero each sample of x [B, ...] with probability ``rate``, scale the rest by 1/(1-rate)."""
    if not training or rate == 0.0:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= rate
    return x * keep.to(x.dtype) / (1 - rate)


class ZigMaBlock(nn.Module):
    """On the pair [h | r]: r = r + h; n = RMSNorm(r); h = n + gate * Mamba(modulate(n)) along the block's path."""

    def __init__(self, hidden_size: int, mixer_cls: MixerFactory, **mixer_kwargs):
        super().__init__()
        self.mixer = mixer_cls(hidden_size, **mixer_kwargs)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.adaLN_modulation = adaln_modulation(hidden_size, 3)

    def forward(self, x: torch.Tensor, c: torch.Tensor, scan: ScanIndex, drop_rate: float = 0.0) -> torch.Tensor:
        # x [B, N or K, 2D] = [h | r], c [B, D] -> the new [h | r]
        h, r = x.chunk(2, dim=-1)
        r = r + stochastic_depth(h, drop_rate, self.training)
        n = self.norm(r)
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)  # [B, D] each
        h = n + gate.unsqueeze(1) * mix_in_scan_order(self.mixer, modulate(n, shift, scale), scan)
        return torch.cat([h, r.to(h.dtype)], dim=-1)


class ZigMaFinalLayer(nn.Module):
    """LayerNorm without affine (eps 1e-6) -> Linear(D, p*p*out_channels); no conditioning."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class ZigMa(nn.Module):
    """Zigzag Mamba over a [B, C, H, W] latent, with TREAD routes (module docstring).

    ``routes``: list of ``Route`` / ``{"start", "end", "ratio"}`` (see :mod:`ssm_tread.routing`);
    ``scan_consistent=False`` reads the survivors in their random selection order (ablation).
    ``num_paths``: blocks cycle through the first ``num_paths`` of the 8 zigzag paths.
    ``num_classes=0``: unconditional (the official image models).
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
        learn_sigma: bool = False,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        num_paths: int = 8,
        pos_embed: str = "learned",
        drop_path: float = 0.0,
        routes: list[RouteSpec] | None = None,
        scan_consistent: bool = True,
        mixer_cls: MixerFactory = Mamba,
    ):
        super().__init__()
        scans = zigma_scans(depth, num_paths)  # raises for num_paths outside 1..8
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r}; choose one of {', '.join(POS_EMBEDS)}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path} is a probability; choose 0 <= drop_path < 1")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.depth = depth
        self.scans = scans  # the zigzag path of each block
        # block i drops its incoming h at rate linspace(0, drop_path, depth)[i - 1] (block 0 never);
        # the final r + h at the full rate
        linspace = [drop_path * k / max(depth - 1, 1) for k in range(depth)]
        self.drop_rates = [0.0] + linspace[:-1]
        self.final_drop_rate = drop_path

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        num_patches = self.x_embedder.num_patches
        if pos_embed == "none":
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=pos_embed == "learned")
            if pos_embed == "sincos":
                self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(hidden_size, self.grid_size)).float().unsqueeze(0))
        mixer_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.blocks = nn.ModuleList([ZigMaBlock(hidden_size, mixer_cls, **mixer_kwargs) for _ in range(depth)])
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-5)
        self.final_layer = ZigMaFinalLayer(hidden_size, patch_size, self.out_channels)
        self.router = TokenRouter(routes, depth, scan_consistent)

        orders, self.block_scan = scan_table(scans, lambda name: scan_order(name, *self.grid_size))
        self.register_buffer("scan_orders", orders, persistent=False)  # [distinct paths, N]

        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (module docstring); the mixers keep their own (dt bias, A_log, D)."""
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
        init_mamba_backbone(self, self.depth)  # zeroes every Linear bias but dt_proj's (the adaLN ones too)
        nn.init.zeros_(self.x_embedder.proj.bias)  # a conv: the pass above leaves it

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_masks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W], t [B] float timesteps (1000 = data), y [B] long labels (ignored when
        unconditional) -> [B, out_channels, H, W].

        With ``return_masks`` also returns BoolTensor [R, B, H, W]: True where the pixel's token went
        through route r of this pass (R = 0 when the pass did not route).
        """
        check_conditioning(x, t, y)
        x = self.x_embedder(x)  # [B, N, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.t_embedder(t)  # [B, D]
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training)

        routing = self.router.begin(training=self.training)
        x = torch.cat([x, torch.zeros_like(x)], dim=-1)  # the residual pair [h | r]: [B, N, 2D]
        for i, block in enumerate(self.blocks):
            x = routing.enter(i, x)  # at a route start: [B, N, 2D] -> kept tokens [B, K, 2D]
            x = block(x, c, routing.scan(self.scan_orders[self.block_scan[i]]), self.drop_rates[i])
            x = routing.exit(i, x)  # at a route end: back to [B, N, 2D]

        h, r = x.chunk(2, dim=-1)
        x = self.final_layer(self.norm_f(r + stochastic_depth(h, self.final_drop_rate, self.training)))  # [B, N, p*p*C_out]
        x = unpatchify(x, self.grid_size, self.patch_size, self.out_channels)  # [B, out_channels, H, W]
        return with_route_masks(x, routing, self.patch_size, return_masks)
