"""SimpleNet's trained parts: the feature adaptor (``Projection``) and the ``Discriminator``.

Module names are ADer's (``layers.0fc``, ``body.block1``, ``tail``), so its weights map by prefix.
Linear weights start Xavier-normal, as ADer's ``init_weight``; biases keep PyTorch's default.
"""

from __future__ import annotations

import torch
from torch import nn


def _xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.xavier_normal_(module.weight)


class Projection(nn.Module):
    """``layers`` linear maps ``dim -> dim`` in a row (ADer's ``pre_proj=1``, ``proj_layer_type=0``:
    one map, no activation), adapting the frozen features to the task."""

    def __init__(self, dim: int, layers: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential()
        for i in range(layers):
            self.layers.add_module(f"{i}fc", nn.Linear(dim, dim))
        self.apply(_xavier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Discriminator(nn.Module):
    """``layers - 1`` blocks (Linear, BatchNorm1d, LeakyReLU 0.2) of width ``hidden``, then a linear
    score without bias: high for normal features, low for noisy ones."""

    def __init__(self, dim: int, layers: int = 2, hidden: int = 1024) -> None:
        super().__init__()
        self.body = nn.Sequential()
        width = dim
        for i in range(layers - 1):
            block = nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2))
            self.body.add_module(f"block{i + 1}", block)
            width = hidden
        self.tail = nn.Linear(width, 1, bias=False)
        self.apply(_xavier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))
