"""Networks with known outputs for prediction tests: a fixed 1x1x1 convolution, so labels are known voxel for voxel."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn


class FixedConv(nn.Module):
    """Logits `weights[k] * x + biases[k]` per class k, on raw intensities (pair with an identity-normalising plan)."""

    def __init__(self, weights: Sequence[float], biases: Sequence[float]) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(padding="same")
        self.conv = nn.Conv3d(1, len(weights), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(list(weights), dtype=torch.float32).view(-1, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor(list(biases), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
