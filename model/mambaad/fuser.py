"""Dilated Mamba fuser: an alternative bottleneck to the Half-FPN (``model.bottleneck.type``).

Our design after the one-line description in MMAD's README ("Dilated Mamba Fuser",
identical-shortcut-resistant reconstruction); MMAD publishes no code or details. The three
teacher scales are fused at 1/16 scale as in the Half-FPN, then passed through one HSS block
per dilation rate ``r``, whose K scan directions read the map along ``r x r`` interleaved
sub-grids (:func:`model.mambaad.scan_orders.dilated_order`): within a sequence, neighbouring tokens lie ``r``
pixels apart, so the state carried to a token summarises context rather than the pixels right
next to it. A stride-2 convolution gives the decoder its ``[B, 2*c2, H/32, W/32]`` input, the
shape the Half-FPN produces, so the decoder is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.input_size import input_hw
from model.mambaad.scan_orders import ScanOptions
from model.mambaad.ss2d import HSSBlock


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DilatedMambaFuser(nn.Module):
    """Fuse teacher maps ``(c0, c1, c2)`` at strides 4, 8, 16 and mix them with dilated-scan HSS blocks.

    ``dilations``: one HSS block per rate, applied in order at the 1/16-scale map (each rate
    must be smaller than that map's side, e.g. 16 at 256x256 input). ``scan``: the scan curve,
    K and backend of those blocks (``model.bottleneck.method`` / ``directions``). ``image_size``
    sizes their stored scan tables; other input sizes work too.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 128, 256),
        dilations: Sequence[int] = (2, 4),
        scan: ScanOptions | None = None,
        d_state: int = 16,
        image_size: int | Sequence[int] = 256,
    ) -> None:
        super().__init__()
        c0, c1, c2 = (int(c) for c in in_channels)
        self.in_channels = (c0, c1, c2)
        self.out_channels = 2 * c2
        h, w = input_hw(image_size)
        side = min(h, w) // 16
        rates = list(dilations)
        bad = [r for r in rates if not isinstance(r, int) or r < 1 or (r > 1 and r >= side)]
        if not rates or bad:
            raise ValueError(
                f"model.bottleneck.dilations={rates!r}: each rate must be a positive integer smaller "
                f"than the {side}-pixel side of the {h // 16}x{w // 16} map it scans (1/16 of "
                f"data.image_size={image_size})"
            )
        self.dilations = tuple(rates)
        self.down0 = _conv_bn_relu(c0, c1, 3, 2)
        self.lat1 = _conv_bn_relu(c1, c1, 1, 1)
        self.down1 = _conv_bn_relu(c1, c2, 3, 2)
        self.lat2 = _conv_bn_relu(c2, c2, 1, 1)
        self.blocks = nn.ModuleList(
            HSSBlock(
                c2,
                d_state=d_state,
                size=(h // 16, w // 16),
                scan=scan or ScanOptions(method="sweep", directions=4),
                dilation=rate,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(c2)
        self.out = _conv_bn_relu(c2, self.out_channels, 3, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[x0, x1, x2]`` -> ``[B, 2*c2, H/32, W/32]`` (the Half-FPN's output shape)."""
        x0, x1, x2 = feats
        f = self.down1(self.lat1(x1) + self.down0(x0)) + self.lat2(x2)
        f = f.permute(0, 2, 3, 1)
        for block in self.blocks:
            f = block(f)
        f = self.norm(f).permute(0, 3, 1, 2).contiguous()
        return self.out(f)
