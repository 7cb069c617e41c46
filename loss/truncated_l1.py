"""SimpleNet's discriminator loss: the truncated L1 (ADer's ``SumLoss`` of its two terms, weight 1).

A normal feature's score should reach ``margin``, a noisy one's fall below ``-margin``; scores
beyond that cost nothing: ``mean(max(0, margin - s_true)) + mean(max(0, margin + s_fake))``.
"""

from __future__ import annotations

import torch
from torch import nn

from util.precision import at_least_float32


class TruncatedL1Loss(nn.Module):
    """``weight * (true + fake)`` of :meth:`terms`; ADer's weight (``SumLoss`` ``lam``) is 1."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def terms(
        self, true_scores: torch.Tensor, fake_scores: torch.Tensor, margin: float = 0.5
    ) -> dict[str, torch.Tensor]:
        """The two terms, each weighted: ``true`` (normal features scored below ``margin``) and
        ``fake`` (noisy features scored above ``-margin``), in float32 at least."""
        true = torch.clamp(margin - at_least_float32(true_scores), min=0).mean()
        fake = torch.clamp(at_least_float32(fake_scores) + margin, min=0).mean()
        return {"true": self.weight * true, "fake": self.weight * fake}

    def forward(
        self, true_scores: torch.Tensor, fake_scores: torch.Tensor, margin: float = 0.5
    ) -> torch.Tensor:
        return sum(self.terms(true_scores, fake_scores, margin).values())
