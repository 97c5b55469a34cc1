"""Test doubles shared by the backbone tests."""

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
