"""Half-FPN bottleneck ("MFF_OCE" in the official code).

Fuses the teacher's three feature maps top-down into the coarsest one and compresses
them with a stride-2 ResNet stage. Attribute names follow the official checkpoints
(``mff_oce.conv1``, ``mff_oce.bn_layer.0.downsample.0``, ...) so their weights load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.resnet import Bottleneck
from torch import nn


class HalfFPN(nn.Module):
    """Multi-scale fusion + one-class embedding for teacher channels ``(c0, c1, c2)``.

    ``f1 = relu(bn21(conv21(x1))) + relu(bn1(conv1(x0)))``;
    ``s = relu(bn2(conv2(f1))) + relu(bn31(conv31(x2)))``; ``s = relu(bnf(convf(s)))``;
    then ``num_blocks`` Bottlenecks (planes ``c2 // 2``, stride 2) give ``2 * c2`` channels
    at half the resolution of ``x2``.
    """

    def __init__(self, in_channels: Sequence[int] = (64, 128, 256), num_blocks: int = 3) -> None:
        super().__init__()
        c0, c1, c2 = (int(c) for c in in_channels)
        planes = c2 // 2
        self.in_channels = (c0, c1, c2)
        self.out_channels = planes * Bottleneck.expansion

        downsample = nn.Sequential(
            nn.Conv2d(c2, self.out_channels, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(self.out_channels),
        )
        blocks: list[nn.Module] = [Bottleneck(c2, planes, stride=2, downsample=downsample)]
        blocks += [Bottleneck(self.out_channels, planes) for _ in range(1, num_blocks)]
        self.bn_layer = nn.Sequential(*blocks)

        self.conv1 = nn.Conv2d(c0, c1, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv21 = nn.Conv2d(c1, c1, kernel_size=1)
        self.bn21 = nn.BatchNorm2d(c1)
        self.conv31 = nn.Conv2d(c2, c2, kernel_size=1)
        self.bn31 = nn.BatchNorm2d(c2)
        self.convf = nn.Conv2d(c2, c2, kernel_size=1)
        self.bnf = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: Kaiming-normal (fan_out) convs, BN 1/0; conv biases keep torch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse teacher maps ``[x0, x1, x2]`` (strides 4, 8, 16) into one ``[B, 2*c2, H/32, W/32]`` map."""
        x0, x1, x2 = feats
        f1 = self.relu(self.bn21(self.conv21(x1))) + self.relu(self.bn1(self.conv1(x0)))
        s = self.relu(self.bn2(self.conv2(f1))) + self.relu(self.bn31(self.conv31(x2)))
        s = self.relu(self.bnf(self.convf(s)))
        return self.bn_layer(s).contiguous()
