"""RD4AD's bottleneck: multi-scale feature fusion (MFF) and one-class embedding (OCE).

The teacher's three maps are brought to the coarsest scale by strided 3x3 convolutions,
concatenated and compressed by a stride-2 stage of ResNet Bottlenecks into the compact embedding
the decoder starts from. Attribute names are ADer's (``mff_oce.conv1``, ``mff_oce.bn_layer.0``,
...) so that its checkpoints load key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.resnet import Bottleneck
from torch import nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class MFFOCE(nn.Module):
    """Fuse teacher maps ``(c0, c1, c2)`` at strides 4, 8, 16 into one ``[B, 2*c2, H/32, W/32]`` map.

    ``l1 = relu(bn2(conv2(relu(bn1(conv1(x0))))))`` and ``l2 = relu(bn3(conv3(x1)))`` reach the
    stride of ``x2``; ``[l1, l2, x2]`` (``3*c2`` channels) go through ``num_blocks`` timm
    Bottlenecks (planes ``c2 // 2``, the first with stride 2 and a 1x1 projection shortcut).
    ``base_width`` is the Bottlenecks' width per group: ADer builds them with 64 even for the
    wide teacher (the original RD4AD code used the teacher's 128).
    """

    def __init__(
        self, in_channels: Sequence[int] = (256, 512, 1024), num_blocks: int = 3, base_width: int = 64
    ) -> None:
        super().__init__()
        c0, c1, c2 = (int(c) for c in in_channels)
        planes = c2 // 2
        self.out_channels = planes * Bottleneck.expansion
        self.conv1 = _conv3x3(c0, c1, 2)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(c1, c2, 2)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = _conv3x3(c1, c2, 2)
        self.bn3 = nn.BatchNorm2d(c2)
        shortcut = nn.Sequential(
            nn.Conv2d(3 * c2, self.out_channels, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(self.out_channels),
        )
        blocks: list[nn.Module] = [
            Bottleneck(3 * c2, planes, stride=2, downsample=shortcut, base_width=base_width)
        ]
        blocks += [Bottleneck(self.out_channels, planes, base_width=base_width) for _ in range(1, num_blocks)]
        self.bn_layer = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The one-class embedding of teacher maps ``[x0, x1, x2]`` (largest first)."""
        x0, x1, x2 = feats
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x0))))))
        l2 = self.relu(self.bn3(self.conv3(x1)))
        return self.bn_layer(torch.cat([l1, l2, x2], dim=1)).contiguous()
