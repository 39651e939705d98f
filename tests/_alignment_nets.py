"""A tiny residual block shared by the GradientAligner tests (one alignment group per block)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.attn(x)))
