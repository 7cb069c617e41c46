"""RD4AD: frozen teacher ``net_t``, one-class bottleneck ``mff_oce``, reverse decoder ``net_s``.

The submodule names and everything below them are ADer's (``model/rd.py``), so its checkpoints
(``{"net": state_dict}`` or bare, with or without DDP's ``module.``) load strictly through
:meth:`model.base.AnomalyModel.load_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from model.anomaly_map import cosine_anomaly_map, gaussian_blur
from model.base import AnomalyModel, OptimizerSpec
from model.rd4ad.bottleneck import MFFOCE
from model.rd4ad.decoder import ReverseDecoder
from model.teacher import TeacherOptions, build_teacher, teacher_options
from util.precision import at_least_float32


class RD4AD(AnomalyModel):
    """Teacher features ``net_t(x)`` vs. the student's reconstruction ``net_s(mff_oce(net_t(x)))``.

    The arguments are the ``model.*`` config keys: ``teacher`` (:class:`TeacherOptions`, or the
    timm name; ADer's is WideResNet50-2 with the ``racm_in1k`` weights, stages 1-3),
    ``bottleneck_blocks`` and ``bottleneck_width`` (the OCE stage: 3 Bottlenecks of width 64 per
    group), ``decoder_blocks`` and ``decoder_width`` (``de_wide_resnet50_2``: 3, 4, 6 blocks of
    width 128 per group) and ``sigma`` (the maps' Gaussian blur). The defaults are ADer's model.
    """

    frozen_layers = ("net_t",)
    teacher_layer = "net_t"

    def __init__(
        self,
        teacher: str | TeacherOptions | Mapping[str, Any] = "wide_resnet50_2.racm_in1k",
        bottleneck_blocks: int = 3,
        bottleneck_width: int = 64,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        decoder_width: int = 128,
        sigma: float = 4.0,
        image_size: int | Sequence[int] = 256,
        log: Callable[[str], object] = print,
    ) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.teacher = teacher_options(teacher)
        t = self.teacher
        self.net_t = build_teacher(
            t.name,
            t.pretrained,
            t.checkpoint,
            out_indices=(1, 2, 3),  # timm's stages layer1-3 (strides 4, 8, 16), as ADer's out_indices
            log=log,
            from_model_checkpoint=t.from_model_checkpoint,
        )
        channels = [int(c) for c in self.net_t.feature_info.channels()]
        if len(channels) != 3 or any(c % 4 for c in channels):
            raise ValueError(f"teacher must yield 3 feature maps of channels divisible by 4, got {channels}")
        self.mff_oce = MFFOCE(channels, num_blocks=bottleneck_blocks, base_width=bottleneck_width)
        self.net_s = ReverseDecoder(
            self.mff_oce.out_channels, channels, blocks=tuple(decoder_blocks), base_width=decoder_width
        )
        self.train(True)

    def forward(self, imgs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(teacher_feats, student_feats)``, each largest map first; teacher detached."""
        with torch.no_grad():
            feats_t = [f.detach() for f in self.net_t(imgs)]
        return feats_t, self.net_s(self.mff_oce(feats_t))

    def optimizers(self, weight_decay: float, no_decay: str = "ader") -> list[OptimizerSpec]:
        """One optimiser over the trainable parameters, in one group when ``weight_decay`` is 0.

        ADer's RD4AD config gives Adam no ``weight_decay``, so its ``get_optim`` passes all of
        ``net.parameters()`` as one group (the frozen teacher's never get gradients); with a
        weight decay it would split them as :meth:`parameter_groups` does.
        """
        if weight_decay:
            return super().optimizers(weight_decay, no_decay)
        return [OptimizerSpec("main", [{"params": [p for p in self.parameters() if p.requires_grad]}])]

    def cost_parts(self) -> dict[str, nn.Module]:
        """Teacher, bottleneck and decoder (``tools/flops.py``; :meth:`parameter_counts` counts every
        parameter, the frozen teacher's included, as ADer's 80.61 M and the MambaAD paper's Table 5)."""
        return {"teacher": self.net_t, "bottleneck": self.mff_oce, "decoder": self.net_s}

    @torch.no_grad()
    def predict(
        self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[B, H, W]`` (at ``out_size``, default the input's) and image scores ``[B]``.

        ADer's ``cal_anomaly_map(amap_mode="add", gaussian_sigma=4)``: per level ``1 - cos`` over
        channels, bilinearly upsampled (``align_corners=True``), summed and divided by
        ``levels * levels`` (its ``len(ft_list) * sum(weights)`` with unit weights), then blurred;
        a score is its map's maximum. The division keeps the maps equal to ADer's; it changes no
        metric (they rank the scores or min-max normalise the maps). Computed in float32 outside
        autocast.
        """
        feats_t, feats_s = self(imgs)
        size = tuple(imgs.shape[-2:]) if out_size is None else tuple(out_size)
        with torch.autocast(imgs.device.type, enabled=False):
            feats_t = [at_least_float32(f) for f in feats_t]
            feats_s = [at_least_float32(f) for f in feats_s]
            levels = len(feats_t)
            maps = cosine_anomaly_map(feats_t, feats_s, size) / (levels * levels)
            maps = gaussian_blur(maps, self.sigma)
        return maps, maps.flatten(1).amax(dim=1)
