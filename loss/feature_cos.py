"""Feature-reconstruction loss of RD4AD: per scale, 1 - cosine similarity of whole feature maps.

ADer's ``CosLoss(avg=False, flat=True)``: each sample's map is flattened to one vector, so the
loss compares the maps as a whole rather than pixel by pixel (the maps still use per-pixel cosine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loss.pairs import feature_pairs
from util.precision import at_least_float32


class FeatureCosineLoss(nn.Module):
    """``weight * sum_i mean_b(1 - cos(flat(f_t[i][b]), flat(f_s[i][b])))``; ADer's RD4AD uses weight 1.

    Summed over scales, not averaged (ADer's ``avg=False``). Computed in float32 under mixed
    precision, and in float64 for float64 features.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, feats_t: Sequence[torch.Tensor], feats_s: Sequence[torch.Tensor]) -> torch.Tensor:
        total = at_least_float32(feats_s[0].new_zeros(()))
        for ft, fs in feature_pairs(feats_t, feats_s):
            cosine = F.cosine_similarity(ft.reshape(ft.shape[0], -1), fs.reshape(fs.shape[0], -1), dim=1)
            total = total + (1.0 - cosine).mean()
        return self.weight * total
