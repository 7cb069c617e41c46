"""SimpleNet (CVPR 2023) as ADer runs it (its ``model/simplenet.py``, ``trainer/simplenet_trainer.py``).

Frozen WideResNet50-2 features of ``layer2`` and ``layer3``, aggregated over 3x3 neighbourhoods
(:mod:`model.simplenet.features`), pass a trained linear adaptor (``pre_projection``); Gaussian
noise added to the adapted features gives "anomalous" ones, and a small MLP (``discriminator``)
learns to score normal features above ``margin`` and noisy ones below ``-margin`` (the truncated
L1 loss, ``loss/truncated_l1.py``). At test time a position's anomaly score is minus its
discriminator score; the map is those scores upsampled (bilinear) and blurred (sigma 4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.anomaly_map import gaussian_blur
from model.base import NO_DECAY_RULES, AnomalyModel, OptimizerSpec
from model.input_size import input_hw
from model.simplenet.backbone import ader_probe, build_backbone, extract_features
from model.simplenet.features import patch_features
from model.simplenet.heads import Discriminator, Projection
from model.teacher import TeacherOptions, teacher_options
from util.precision import at_least_float32

# ADer's SimpleNetTrainer: AdamW over the adaptor at 0.1 x optim.lr, Adam over the discriminator
# at 0.2 x optim.lr with 1e-3 x the weight decay (its config's dsc_opt).
ADAPTOR_LR_SCALE = 0.1
DISCRIMINATOR_LR_SCALE = 0.2
DISCRIMINATOR_DECAY_SCALE = 1e-3

# ADer's SIMPLENET holds its backbone three times (model_backbone, and inside net_simplenet as
# backbone and forward_modules.feature_aggregator.backbone): one copy is kept, the others dropped
ADER_PREFIXES = {
    "model_backbone.": "backbone.",
    "net_simplenet.pre_projection.": "pre_projection.",
    "net_simplenet.discriminator.": "discriminator.",
}
ADER_ALIASES = ("net_simplenet.backbone.", "net_simplenet.forward_modules.feature_aggregator.backbone.")


def ader_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ADer's SimpleNet state dict in our module names (other dicts are returned as they are)."""
    if not any(k.startswith("net_simplenet.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith(ADER_ALIASES):
            continue
        prefix = next((p for p in ADER_PREFIXES if key.startswith(p)), None)
        out[ADER_PREFIXES[prefix] + key.removeprefix(prefix) if prefix else key] = value
    return out


def _split_decay(
    module: nn.Module, weight_decay: float, no_decay: str, lr_scale: float
) -> list[dict[str, Any]]:
    """``[{decay}, {no decay}]`` over ``module``'s trainable parameters (ADer's ``add_weight_decay``
    on the sub-network it hands to each optimiser), both at ``lr_scale`` x ``optim.lr``."""
    rule = NO_DECAY_RULES[no_decay]
    norms = {
        id(p)
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    }
    decay, undecayed = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (undecayed if rule(name, p, norms) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": undecayed, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]


class SimpleNet(AnomalyModel):
    """Adapted patch features scored by a discriminator trained against Gaussian-noised copies.

    The arguments are the ``model.*`` config keys; the defaults are ADer's benchmark model:
    ``teacher`` (the frozen backbone, :class:`TeacherOptions` or a timm name), ``layers`` (its
    feature layers), ``patch_size``/``patch_stride`` (the neighbourhood aggregation),
    ``embed_dim`` (each level pooled to it) and ``target_dim`` (the levels pooled together to it:
    the adapted features' width), ``adaptor_layers``, ``dsc_layers``/``dsc_hidden`` (the
    discriminator), ``noise_std`` and ``mix_noise`` (noise scales ``noise_std * 1.1**k``,
    ``k < mix_noise``, one drawn per feature), ``margin`` (of the truncated L1 loss) and
    ``sigma`` (the maps' blur); ``ader_bn_probe`` moves the backbone's BatchNorm statistics as
    building ADer's model does (:func:`model.simplenet.backbone.ader_probe`; a full model
    checkpoint brings its own).
    """

    frozen_layers = ("backbone",)
    teacher_layer = "backbone"

    def __init__(
        self,
        teacher: str | TeacherOptions | Mapping[str, Any] = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer2", "layer3"),
        patch_size: int = 3,
        patch_stride: int = 1,
        embed_dim: int = 1536,
        target_dim: int = 1536,
        adaptor_layers: int = 1,
        dsc_layers: int = 2,
        dsc_hidden: int = 1024,
        noise_std: float = 0.015,
        mix_noise: int = 1,
        margin: float = 0.5,
        sigma: float = 4.0,
        ader_bn_probe: bool = True,
        image_size: int | Sequence[int] = 256,
        log: Callable[[str], object] = print,
    ) -> None:
        super().__init__()
        self.teacher = teacher_options(teacher)
        t = self.teacher
        self.layers = tuple(layers)
        self.patch_size, self.patch_stride = int(patch_size), int(patch_stride)
        self.embed_dim, self.target_dim = int(embed_dim), int(target_dim)
        self.noise_std, self.mix_noise = float(noise_std), int(mix_noise)
        self.margin, self.sigma = float(margin), float(sigma)
        self.backbone = build_backbone(t.name, t.pretrained, t.checkpoint, log, t.from_model_checkpoint)
        if ader_bn_probe and not t.from_model_checkpoint:
            ader_probe(self.backbone, input_hw(image_size))
        self.pre_projection = Projection(self.target_dim, adaptor_layers)
        self.discriminator = Discriminator(self.target_dim, dsc_layers, dsc_hidden)
        self.train(True)

    def embed(self, imgs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frozen patch descriptors ``[B * H * W, target_dim]`` and their grid ``(H, W)``."""
        with torch.no_grad():
            feats = extract_features(self.backbone, imgs, self.layers)
            return patch_features(feats, self.patch_size, self.patch_stride, self.embed_dim, self.target_dim)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """Gaussian noise for each row of ``like``, its scale ``noise_std * 1.1**k`` with ``k`` drawn
        per row among ``mix_noise`` scales; from the global generator of ``like``'s device (saved
        with every checkpoint), drawn as ADer draws it (the scale indices, then each scale's noise,
        in float32 whatever ``like``'s type), so the same seed gives ADer's numbers on the CPU."""
        n, device = len(like), like.device
        pick = F.one_hot(torch.randint(0, self.mix_noise, (n,), device=device), self.mix_noise)
        noise = torch.stack(
            [
                torch.normal(0.0, self.noise_std * 1.1**k, like.shape, device=device, dtype=torch.float32)
                for k in range(self.mix_noise)
            ],
            dim=1,
        )
        return (noise * pick.unsqueeze(-1)).sum(1).to(like.dtype)

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Training: the discriminator's scores ``(true [N, 1], fake [N, 1])`` of the adapted
        features and of their noisy copies (one batch through it, as ADer). Evaluation: the
        anomaly score of every position, ``[B, H, W]`` (minus the discriminator's score)."""
        if not self.training:
            return self.patch_scores(imgs)
        feats, _ = self.embed(imgs)
        true = self.pre_projection(feats)
        scores = self.discriminator(torch.cat([true, true + self.noise(true)]))
        return scores[: len(true)], scores[len(true) :]

    def patch_scores(self, imgs: torch.Tensor) -> torch.Tensor:
        """Each position's anomaly score ``[B, H, W]``: minus the discriminator's score of its
        adapted feature (its BatchNorm in the mode the caller set: eval when testing)."""
        feats, grid = self.embed(imgs)
        return -self.discriminator(self.pre_projection(feats)).reshape(len(imgs), *grid)

    def loss_terms(
        self, outputs: Any, batch: Mapping[str, Any], criterion: Callable[..., torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The truncated L1's two terms (``loss.type=truncated_l1``) at ``margin``: ``true``, ``fake``."""
        true_scores, fake_scores = outputs
        return criterion.terms(true_scores, fake_scores, self.margin)

    def optimizers(self, weight_decay: float, no_decay: str = "ader") -> list[OptimizerSpec]:
        """ADer's two optimisers, each over its own part: ``adaptor`` (``optim.type``, AdamW, at
        0.1 x ``optim.lr``, weight decay ``optim.weight_decay``) and ``discriminator`` (Adam, at
        0.2 x ``optim.lr``, weight decay 1e-3 x ``optim.weight_decay``, as an L2 term); 1-D
        tensors and biases undecayed in both, as ADer's ``get_optim``."""
        adaptor = _split_decay(self.pre_projection, weight_decay, no_decay, ADAPTOR_LR_SCALE)
        decay = weight_decay * DISCRIMINATOR_DECAY_SCALE
        discriminator = _split_decay(self.discriminator, decay, no_decay, DISCRIMINATOR_LR_SCALE)
        return [OptimizerSpec("adaptor", adaptor), OptimizerSpec("discriminator", discriminator, type="adam")]

    def checkpoint_state(self, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
        """Ours, or ADer's ``net.pth``/``ckpt.pth`` renamed (:func:`ader_to_ours`)."""
        return ader_to_ours(state)

    def cost_parts(self) -> dict[str, nn.Module]:
        """Backbone, adaptor and discriminator (``tools/flops.py``); the count includes the whole
        backbone (``layer4`` and ``fc`` too), as ADer's module and the paper's 72.8 M."""
        return {
            "backbone": self.backbone,
            "adaptor": self.pre_projection,
            "discriminator": self.discriminator,
        }

    @torch.no_grad()
    def predict(
        self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[B, H, W]`` (at ``out_size``, default the input's) and image scores ``[B]``.

        ADer's ``predict``: the positions' scores upsampled bilinearly (``align_corners=False``)
        and blurred with sigma 4 (scipy's ``gaussian_filter``). The image score is the map's
        maximum: ADer's evaluator scores images by the map's maximum (``pooling_ks=None``); the
        unblurred patch maximum its ``predict`` also returns is never used. In float32.
        """
        size = tuple(imgs.shape[-2:]) if out_size is None else tuple(out_size)
        scores = self.patch_scores(imgs)
        with torch.autocast(imgs.device.type, enabled=False):
            scores = at_least_float32(scores).unsqueeze(1)
            maps = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)[:, 0]
            maps = gaussian_blur(maps, self.sigma)
        return maps, maps.flatten(1).amax(dim=1)
