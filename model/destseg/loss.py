"""DeSTSeg's losses (ADer ``loss/base_loss.py``: ``CSUMLoss``, ``L1Loss``, ``FFocalLoss``) and the
config's ``loss`` entry that picks them by training stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cosine_sum_loss(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of each ``1 - cos`` map's sum divided by its height x width (so a batch's
    pixels add up over the batch, as ADer's ``CSUMLoss``)."""
    return sum(m.sum() / (m.shape[-2] * m.shape[-1]) for m in maps)


def focal_loss(
    probs: torch.Tensor, targets: torch.Tensor, gamma: float = 4.0, alpha: float = -1.0
) -> torch.Tensor:
    """Mean binary focal loss of probabilities against 0/1 targets: ``BCE * (1 - p_t) ** gamma``,
    ``p_t`` the probability of the true class; ``alpha >= 0`` weighs positives by alpha and
    negatives by ``1 - alpha``. Computed in float32."""
    probs, targets = probs.float(), targets.float()
    bce = F.binary_cross_entropy(probs, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean()


class DeSTSegLoss:
    """The config's ``loss`` section for DeSTSeg (``loss.type=destseg``).

    Stage ``student``: the cosine-sum loss of the denoising student's ``1 - cos`` maps. Stage
    ``segmentation``: L1 and focal loss of the segmentation output against the synthetic mask.
    Every term is multiplied by ``weight`` (ADer: each ``lam`` is 1); ``focal_gamma`` and
    ``focal_alpha`` are the focal loss's (ADer: 4 and -1, no class weighting).
    """

    def __init__(self, weight: float = 1.0, focal_gamma: float = 4.0, focal_alpha: float = -1.0) -> None:
        self.weight = float(weight)
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)

    def student(self, cos_maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student stage's term, ``cos``."""
        return {"cos": self.weight * cosine_sum_loss(cos_maps)}

    def segmentation(self, seg: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The segmentation stage's terms, ``l1`` and ``focal``."""
        return {
            "l1": self.weight * F.l1_loss(seg, mask),
            "focal": self.weight * focal_loss(seg, mask, self.focal_gamma, self.focal_alpha),
        }
