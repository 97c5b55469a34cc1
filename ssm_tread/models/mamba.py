"""The Mamba-1 mixer (Gu & Dao), with mamba-ssm's parameter names and initialisation.

x [B, L, D] -> in_proj -> (x, z) [B, E, L] each; x -> causal depthwise conv -> SiLU -> x_proj ->
(dt, B, C); dt -> dt_proj (its bias goes into the selective scan, then softplus);
y = selective_scan(x, dt, A, B, C) + D x; y * SiLU(z) -> out_proj -> [B, L, D]. The selective scan (the SSM
recurrence) runs along L in the order the tokens lie; which scan order that is, the caller decides.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

from ssm_tread.models.macs import selective_scan_macs
from ssm_tread.ops import causal_conv1d, selective_scan
from ssm_tread.ops.selective_scan import at_least_fp32


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        E, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        # dt_proj: weights ~ U(+-R^-0.5); bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # A = -exp(A_log) = -(1, ..., N) for every channel (S4D-real)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x [B, L, {self.d_model}], got {list(x.shape)}")
        x, z = rearrange(self.in_proj(x), "b l e -> b e l").chunk(2, dim=1)  # [B, E, L] each
        x = causal_conv1d(x, rearrange(self.conv1d.weight, "e 1 k -> e k"), self.conv1d.bias, "silu")
        x_dbl = self.x_proj(rearrange(x, "b e l -> b l e"))  # [B, L, R + 2N]
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(dt @ self.dt_proj.weight.t(), "b l e -> b e l")  # bias added inside the selective scan
        B = rearrange(B, "b l n -> b n l").contiguous()
        C = rearrange(C, "b l n -> b n l").contiguous()
        A = -torch.exp(at_least_fp32(self.A_log))  # [E, N]
        y = selective_scan(
            x, dt, A, B, C, at_least_fp32(self.D), z=z, delta_bias=at_least_fp32(self.dt_proj.bias),
            delta_softplus=True,
        )
        return self.out_proj(rearrange(y, "b e l -> b l e"))

    def extra_macs(self, inputs: tuple, output: torch.Tensor) -> int:
        """MACs that :func:`count_macs` cannot see as module calls: the causal conv and dt projection
        (both applied through their weights) and the selective scan."""
        batch, length, _ = inputs[0].shape
        tokens = batch * length
        return (
            tokens * self.d_inner * self.d_conv
            + tokens * self.dt_rank * self.d_inner
            + selective_scan_macs(batch, length, self.d_inner, self.d_state)
        )
