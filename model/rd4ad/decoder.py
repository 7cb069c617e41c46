"""RD4AD's student: a ResNet run backwards (``de_wide_resnet50_2`` in ADer).

Each stage doubles the resolution with a 2x2 transposed convolution (in its first block's middle
convolution and in the shortcut) and reduces the channels, so the three stages reproduce the
teacher's maps from the coarsest to the finest. Attribute names are ADer's (``net_s.layer1.0.
upsample.0``, ...) so that its checkpoints load key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _deconv2x2(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2, bias=False)


class DeBottleneck(nn.Module):
    """A ResNet Bottleneck (1x1, 3x3, 1x1, expansion 4) whose 3x3 becomes a 2x2 stride-2
    transposed convolution when ``upsample`` (the shortcut's projection) doubles the size."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, upsample: nn.Module | None = None, base_width: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * base_width / 64)
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if upsample is not None:
            self.conv2: nn.Module = _deconv2x2(width, width)
        else:
            self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


class ReverseDecoder(nn.Module):
    """Three upsampling stages from the bottleneck's ``in_channels`` to the teacher's channels.

    ``out_channels`` are the teacher's ``(c0, c1, c2)`` (largest map first); stage ``i`` has
    ``blocks[i]`` DeBottlenecks of width ``planes * base_width / 64``, ``planes = c / 4``.
    ADer's ``de_wide_resnet50_2`` is ``in_channels=2048``, ``(256, 512, 1024)``, ``blocks=(3, 4,
    6)``, ``base_width=128``. Returns the maps largest first, as the teacher does.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        out_channels: Sequence[int] = (256, 512, 1024),
        blocks: Sequence[int] = (3, 4, 6),
        base_width: int = 128,
    ) -> None:
        super().__init__()
        c0, c1, c2 = (int(c) for c in out_channels)
        self.inplanes = int(in_channels)
        self.layer1 = self._stage(c2, blocks[0], base_width)
        self.layer2 = self._stage(c1, blocks[1], base_width)
        self.layer3 = self._stage(c0, blocks[2], base_width)
        for m in self.modules():  # transposed convolutions keep torch's default init, as in ADer
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, channels: int, num_blocks: int, base_width: int) -> nn.Sequential:
        planes = channels // DeBottleneck.expansion
        upsample = nn.Sequential(_deconv2x2(self.inplanes, channels), nn.BatchNorm2d(channels))
        layers = [DeBottleneck(self.inplanes, planes, upsample, base_width)]
        self.inplanes = channels
        layers += [DeBottleneck(channels, planes, base_width=base_width) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps at 2x, 4x and 8x the input's resolution, returned largest first."""
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        return [c, b, a]
