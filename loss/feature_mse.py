"""Feature-reconstruction loss: sum over scales of MSE(teacher, student) (paper section 4.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loss.pairs import feature_pairs
from util.precision import at_least_float32


class FeatureMSELoss(nn.Module):
    """``weight * sum_i mean((f_t[i] - f_s[i])**2)``; the official config uses weight 5.0.

    Computed in float32 under mixed precision, and in float64 for float64 features.
    """

    def __init__(self, weight: float = 5.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, feats_t: Sequence[torch.Tensor], feats_s: Sequence[torch.Tensor]) -> torch.Tensor:
        total = at_least_float32(feats_s[0].new_zeros(()))
        for ft, fs in feature_pairs(feats_t, feats_s):
            total = total + torch.mean((ft - fs) ** 2)
        return self.weight * total
