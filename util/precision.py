"""The working precision of numerically sensitive steps (scans, losses, anomaly maps)."""

from __future__ import annotations

import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is narrower (16-bit under mixed precision), else unchanged.

    Scans, losses and anomaly maps lose too much in 16 bits; a float64 computation (a test's
    reference of the same model) stays float64 throughout.
    """
    return t if t.dtype == torch.float64 else t.float()
