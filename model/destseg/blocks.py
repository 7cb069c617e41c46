"""DeSTSeg's building blocks: ResNet BasicBlock stages and the ASPP head, with ADer's module names
(``model/destseg.py``), so its checkpoints load key for key."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock
from torch import nn


def basic_stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """``blocks`` stride-1 BasicBlocks from ``inplanes`` to ``planes`` channels; the first gets a
    1x1 convolution + BatchNorm shortcut when the width changes (ADer's ``make_layer``)."""
    shortcut = None
    if inplanes != planes:
        shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, downsample=shortcut)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def kaiming_init(module: nn.Module) -> None:
    """ADer's initialisation of the decoder and the segmentation network's residual stage:
    convolutions Kaiming-normal (fan-out, ReLU), norm layers weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ConvNormAct(nn.Module):
    """Convolution without bias, BatchNorm, ReLU (ADer's ``ConvNormAct2d`` with BN and ReLU)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, padding: int | str = "same", dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a global-pool branch and one branch per dilation rate
    (1x1 for rate 1, else 3x3), concatenated and fused by a 3x3 ConvNormAct."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(cin, cout, 1))]
        for r in rates:
            branches.append(
                ConvNormAct(cin, cout, 1 if r == 1 else 3, padding=0 if r == 1 else r, dilation=r)
            )
        self.aspp_feature_extractors = nn.ModuleList(branches)
        self.aspp_fusion_layer = ConvNormAct((1 + len(rates)) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.aspp_feature_extractors]
        outs[0] = F.interpolate(outs[0], size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.aspp_fusion_layer(torch.cat(outs, dim=1))


class StudentDecoder(nn.Module):
    """Decodes the student encoder's stride-32 map back to strides 16, 8 and 4 (two BasicBlocks per
    level, bilinear upsampling between levels to the encoder's map sizes)."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), blocks: int = 2) -> None:
        super().__init__()
        w1, w2, w3, w4 = (int(w) for w in widths)
        self.decoder_layer4 = basic_stage(w4, w4, blocks)
        self.decoder_layer3 = basic_stage(w4, w3, blocks)
        self.decoder_layer2 = basic_stage(w3, w2, blocks)
        self.decoder_layer1 = basic_stage(w2, w1, blocks)
        kaiming_init(self)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``feats``: the encoder's four maps (strides 4-32); returns three, largest first."""
        x1, x2, x3, x4 = feats
        b3 = self.decoder_layer3(_resize(self.decoder_layer4(x4), x3))
        b2 = self.decoder_layer2(_resize(b3, x2))
        b1 = self.decoder_layer1(_resize(b2, x1))
        return [b1, b2, b3]


class SegmentationNet(nn.Module):
    """Two BasicBlocks, ASPP, a 3x3 conv-BN-ReLU and a 1x1 convolution to one sigmoid channel."""

    def __init__(self, inplanes: int = 448, width: int = 256, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.res = basic_stage(inplanes, width, 2)
        kaiming_init(self.res)  # ADer initialises the residual stage only; the head keeps torch's init
        self.head = nn.Sequential(
            ASPP(width, width, rates),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.res(x)))


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)
