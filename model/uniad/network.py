"""UniAD: reconstruct frozen EfficientNet features with a neighbour-masked transformer.

Submodule names (``net_backbone``, ``net_merge``, ``net_ad``) and everything below them are those
of ADer's ``model/uniad.py``, so its checkpoints load strictly through the default
:meth:`model.base.AnomalyModel.load_weights` (``{"net": ...}`` or bare, ``module.`` or not).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.base import AnomalyModel
from model.teacher import TeacherOptions, teacher_options
from model.uniad.backbone import ALIGN_STRIDE, FeatureAlign, build_backbone, extract_features
from model.uniad.transformer import LearnedPositionEmbedding, ReconstructionTransformer
from util.config import options
from util.precision import at_least_float32

# ADer's backbone: timm's default tag of tf_efficientnet_b4 (ADer passes pretrained=True and no tag)
DEFAULT_BACKBONE = "tf_efficientnet_b4.ns_jft_in1k"


@dataclass(frozen=True)
class JitterOptions:
    """``model.jitter``: feature jitter during training (UniAD section 3.4).

    With probability ``prob`` per batch, each token gets Gaussian noise of standard deviation
    ``scale * |token| / channels``; ``scale`` 0 disables it.
    """

    scale: float = 20.0
    prob: float = 1.0


def default_neighbor_size(feature_size: Sequence[int]) -> tuple[int, int]:
    """ADer's benchmark rule: half the stride-16 side, ``image_size // 32`` (8 at 256)."""
    return max(1, feature_size[0] // 2), max(1, feature_size[1] // 2)


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """One side or ``[height, width]`` as ``(height, width)``."""
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"expected one side or [height, width], got {value!r}")
    return int(value[0]), int(value[1])


def pooled_max(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Image scores ``[B]``: the maximum of each ``[B, H, W]`` map after a ``pool`` x ``pool``
    average filter with stride 1 (ADer's ``pooling_ks``); the window is clipped to the map."""
    k = max(1, min(int(pool), maps.shape[-2], maps.shape[-1]))
    pooled = F.avg_pool2d(maps[:, None], k, stride=1) if k > 1 else maps[:, None]
    return pooled.flatten(1).amax(dim=1)


class Reconstruction(nn.Module):
    """Tokens of the aligned features -> projection -> transformer -> projection back (``net_ad``)."""

    def __init__(
        self,
        channels: int,
        feature_size: tuple[int, int],
        hidden_dim: int,
        num_heads: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        dropout: float,
        neighbor_size: tuple[int, int] | None,
        neighbor_mask: Sequence[bool],
        jitter: JitterOptions,
    ) -> None:
        super().__init__()
        self.feature_size = feature_size
        self.jitter = jitter
        self.pos_embed = LearnedPositionEmbedding(feature_size, hidden_dim)
        self.transformer = ReconstructionTransformer(
            feature_size,
            hidden_dim,
            num_heads,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            neighbor_size,
            neighbor_mask,
        )
        self.input_proj = nn.Linear(channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, channels)
        for m in self.modules():  # the authors' initialiser: Xavier-uniform weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def add_jitter(self, tokens: torch.Tensor) -> torch.Tensor:
        """Add noise proportional to each token's norm (``[H*W, B, C]`` tokens).

        One Python ``random`` draw decides per batch; the noise is drawn on the CPU generator
        (then moved), as the authors' code does, so a seeded run draws the same noise anywhere.
        """
        if random.uniform(0, 1) > self.jitter.prob:
            return tokens
        scale = tokens.norm(dim=2, keepdim=True) / tokens.shape[2]
        noise = torch.randn(tokens.shape).to(device=tokens.device, dtype=tokens.dtype)
        return tokens + noise * scale * self.jitter.scale

    def forward(self, feature_align: torch.Tensor) -> torch.Tensor:
        """Reconstructed features ``[B, C, H, W]`` of the aligned features."""
        b, c, h, w = feature_align.shape
        if (h, w) != self.feature_size:
            built = f"{self.feature_size[0] * ALIGN_STRIDE}x{self.feature_size[1] * ALIGN_STRIDE}"
            raise ValueError(
                f"UniAD was built for {built} inputs (model.image_size), got features of a "
                f"{h * ALIGN_STRIDE}x{w * ALIGN_STRIDE} input"
            )
        tokens = feature_align.flatten(2).permute(2, 0, 1)  # [H*W, B, C]
        if self.training and self.jitter.scale:
            tokens = self.add_jitter(tokens)
        out = self.transformer(self.input_proj(tokens), self.pos_embed())
        return self.output_proj(out).permute(1, 2, 0).reshape(b, c, h, w)


class UniAD(AnomalyModel):
    """Frozen backbone features, aligned at stride 16 (272 channels), reconstructed by a transformer.

    The arguments are the ``model.*`` config keys: ``teacher`` (the backbone,
    :class:`model.teacher.TeacherOptions` fields), the transformer's sizes, ``neighbor_size``
    (masked window, ``[h, w]`` or one number; None: ADer's ``image_size // 32``),
    ``neighbor_mask`` (which of encoder / decoder attentions are masked), ``jitter``
    (:class:`JitterOptions`, training only) and ``score_pool`` (image score: max of the map after
    this average filter). The defaults are ADer's benchmark model at ``image_size``.
    ``forward`` returns ``([feature_align], [feature_rec])`` for the config's ``feature_mse`` loss.
    """

    frozen_layers = ("net_backbone",)
    teacher_layer = "net_backbone"

    def __init__(
        self,
        teacher: str | TeacherOptions | Mapping[str, Any] = DEFAULT_BACKBONE,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        neighbor_size: int | Sequence[int] | None = None,
        neighbor_mask: Sequence[bool] = (True, True, True),
        jitter: JitterOptions | Mapping[str, Any] | None = None,
        score_pool: int = 16,
        image_size: int | Sequence[int] = 256,
        log: Callable[[str], object] = print,
    ) -> None:
        super().__init__()
        self.teacher = teacher_options(teacher)
        self.score_pool = int(score_pool)
        height, width = as_pair(image_size)
        if height % ALIGN_STRIDE or width % ALIGN_STRIDE:
            raise ValueError(f"UniAD needs image sides divisible by {ALIGN_STRIDE}, got {height}x{width}")
        feature_size = (height // ALIGN_STRIDE, width // ALIGN_STRIDE)
        neighbours = default_neighbor_size(feature_size) if neighbor_size is None else as_pair(neighbor_size)
        t = self.teacher
        self.net_backbone = build_backbone(
            t.name, t.pretrained, t.checkpoint, log=log, from_model_checkpoint=t.from_model_checkpoint
        )
        self.net_merge = FeatureAlign()
        self.net_ad = Reconstruction(
            channels=sum(self.net_backbone.feature_info.channels()),
            feature_size=feature_size,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            neighbor_size=neighbours,
            neighbor_mask=neighbor_mask,
            jitter=options(JitterOptions, jitter),
        )
        self.train(True)

    def align(self, imgs: torch.Tensor) -> torch.Tensor:
        """The aligned backbone features ``[B, 272, H/16, W/16]`` (no gradient)."""
        with torch.no_grad():
            return self.net_merge(extract_features(self.net_backbone, imgs)).detach()

    def forward(self, imgs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([feature_align], [feature_rec])``: the target and its reconstruction."""
        feature_align = self.align(imgs)
        return [feature_align], [self.net_ad(feature_align)]

    @torch.no_grad()
    def predict(
        self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[B, H, W]`` (at ``out_size``, default the input's) and image scores ``[B]``.

        The map is the L2 norm over channels of ``rec - align``, upsampled bilinearly
        (``align_corners=True``) without blur; the score is the maximum of the map at the input
        size after a ``score_pool`` average filter (ADer's ``pooling_ks``), so it does not
        depend on ``out_size``. Computed in float32 outside autocast.
        """
        (feature_align,), (feature_rec,) = self(imgs)
        in_size = tuple(imgs.shape[-2:])
        size = in_size if out_size is None else tuple(out_size)
        with torch.autocast(imgs.device.type, enabled=False):
            diff = at_least_float32(feature_rec) - at_least_float32(feature_align)
            small = torch.sqrt(torch.sum(diff**2, dim=1, keepdim=True))
            full = F.interpolate(small, size=in_size, mode="bilinear", align_corners=True)
            scores = pooled_max(full[:, 0], self.score_pool)
            if size != in_size:
                full = F.interpolate(small, size=size, mode="bilinear", align_corners=True)
            return full[:, 0], scores


def count_parameters(model: UniAD) -> dict[str, int]:
    """Parameter counts: ``backbone`` (the whole timm feature model, with its stride-32 stages that
    no output uses, as ADer's 24.52 M counts them), ``transformer`` (``net_ad``), ``total``, ``trainable``."""
    counts = {
        "backbone": sum(p.numel() for p in model.net_backbone.parameters()),
        "transformer": sum(p.numel() for p in model.net_ad.parameters()),
    }
    counts["total"] = counts["backbone"] + counts["transformer"]
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts
