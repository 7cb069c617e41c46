"""The teacher and student feature maps a feature loss compares, scale by scale."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from util.precision import at_least_float32


def feature_pairs(
    feats_t: Sequence[torch.Tensor], feats_s: Sequence[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(teacher, student)`` per scale, checked to match, in float32 (float64 stays float64)."""
    if len(feats_t) != len(feats_s):
        raise ValueError(f"teacher gave {len(feats_t)} scales but student {len(feats_s)}")
    for ft, fs in zip(feats_t, feats_s, strict=True):
        if ft.shape != fs.shape:
            raise ValueError(f"teacher feature {tuple(ft.shape)} != student feature {tuple(fs.shape)}")
        yield at_least_float32(ft), at_least_float32(fs)
