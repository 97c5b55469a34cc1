"""Layers shared by every backbone: embedders, position embedding, adaLN modulation, final layer.

Module and parameter names follow the reference DiT implementation, so its checkpoints load as-is
(``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``adaLN_modulation.1``,
``final_layer.{linear,adaLN_modulation.1}``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ssm_tread.routing import RoutingPass


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, L, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln_modulation(hidden_size: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(D, chunks * D): the per-block modulation of the condition vector."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))


def to_2tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, (H/p)*(W/p), D] in raster order, by a p x p strided conv."""

    def __init__(self, input_size: int | tuple[int, int], patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        height, width = to_2tuple(input_size)
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"input size {height}x{width} is not divisible by patch size {patch_size}; "
                f"choose a patch size that divides both sides"
            )
        self.input_size = (height, width)
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != self.input_size or x.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"expected input [B, {self.proj.in_channels}, {self.input_size[0]}, {self.input_size[1]}], "
                f"got {list(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, embed_dim]: sin of half the frequencies, then cos."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """Fixed 2D sin-cos position embedding [H*W, embed_dim] in raster order (DiT/MAE layout:
    the first half encodes the column, the second half the row)."""
    height, width = to_2tuple(grid_size)
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps [B] -> [B, D]: 256-d sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, D]. Row ``num_classes`` is the null class used for classifier-free
    guidance; in training each label is replaced by it with probability ``dropout_prob``.
    ``null_class`` (default: ``dropout_prob > 0``) says whether the table has that row."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, null_class: bool | None = None):
        super().__init__()
        use_null_class = dropout_prob > 0 if null_class is None else null_class
        self.embedding_table = nn.Embedding(num_classes + use_null_class, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if labels.dim() != 1:
            raise ValueError(f"class labels must be a 1-D tensor [B], got shape {list(labels.shape)}")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """norm -> adaLN (shift, scale) -> Linear(D, p*p*out_channels). ``norm``: DiT's LayerNorm without
    affine (eps 1e-6) unless given."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: nn.Module | None = None):
        super().__init__()
        self.norm_final = norm or nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, grid_size: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Tokens [B, h*w, p*p*C] in raster order -> image [B, C, h*p, w*p]."""
    h, w = grid_size
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def token_masks_to_pixels(masks: torch.Tensor, grid_size: int | tuple[int, int], patch_size: int) -> torch.Tensor:
    """Per-token route masks [R, B, h*w] (raster order over the patch grid) -> per-pixel masks
    [R, B, h*p, w*p]: every pixel of a patch takes its token's value."""
    h, w = to_2tuple(grid_size)
    if masks.dim() != 3 or masks.shape[-1] != h * w:
        raise ValueError(f"expected token masks [R, B, {h * w}] for a {h}x{w} grid, got {list(masks.shape)}")
    routes, batch = masks.shape[:2]
    p = patch_size
    pixels = masks.reshape(routes, batch, h, 1, w, 1).expand(routes, batch, h, p, w, p)
    return pixels.reshape(routes, batch, h * p, w * p)


def with_route_masks(
    x: torch.Tensor, routing: RoutingPass, patch_size: int, return_masks: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What a backbone's forward returns: its output ``x`` [B, C, H, W], and with ``return_masks`` also
    BoolTensor [R, B, H, W], True where the pixel's token went through route r of this pass (R = 0 when the
    pass did not route). The pass's routable positions (default: the whole sequence) are the grid tokens in
    raster order."""
    if not return_masks:
        return x
    batch, _, height, width = x.shape
    grid_size = (height // patch_size, width // patch_size)
    kept = routing.kept_masks()  # R x [B, L]
    if kept:
        grid = routing.routable if routing.routable is not None else slice(None)
        token_masks = torch.stack(kept)[:, :, grid]  # [R, B, h*w]
    else:
        token_masks = torch.zeros(0, batch, grid_size[0] * grid_size[1], dtype=torch.bool, device=x.device)
    return x, token_masks_to_pixels(token_masks, grid_size, patch_size)


def check_conditioning(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """t and y must be one value per sample: [B] for x [B, C, H, W]."""
    batch = x.shape[0]
    if t.shape != (batch,) or y.shape != (batch,):
        raise ValueError(
            f"expected t and y of shape [{batch}] for a batch of {batch}, "
            f"got t {list(t.shape)} and y {list(y.shape)}"
        )

