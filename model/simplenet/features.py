"""SimpleNet's local patch features: each backbone position described by its neighbourhood.

ADer (after PatchCore): every level is unfolded into ``patch_size`` x ``patch_size`` neighbourhoods,
the deeper levels are resized (bilinear) onto the first level's grid, each level's flattened
neighbourhood is average-pooled to ``embed_dim`` values, and the levels' vectors are pooled
together to ``target_dim``. One row per position of the first level, ``(b, y, x)`` in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def patchify(feat: torch.Tensor, patch_size: int, stride: int = 1) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C * p * p, H', W']``: each position's ``p x p`` neighbourhood
    (zero-padded), flattened channel-major as ``torch.nn.Unfold`` orders it."""
    pad = (patch_size - 1) // 2
    b, c, h, w = feat.shape
    rows, cols = ((s + 2 * pad - (patch_size - 1) - 1) // stride + 1 for s in (h, w))
    unfolded = F.unfold(feat, kernel_size=patch_size, stride=stride, padding=pad)
    return unfolded.reshape(b, c * patch_size * patch_size, rows, cols)


def patch_features(
    feats: Sequence[torch.Tensor], patch_size: int, stride: int, embed_dim: int, target_dim: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The ``[B * H * W, target_dim]`` descriptors of ``feats`` and the first level's grid ``(H, W)``."""
    patches = [patchify(f, patch_size, stride) for f in feats]
    grid = tuple(patches[0].shape[-2:])
    pooled = []
    for level in patches:
        if tuple(level.shape[-2:]) != grid:
            # one plane per channel, as ADer: PyTorch's CPU kernel rounds the batched layout differently
            planes = level.reshape(-1, 1, *level.shape[-2:])
            planes = F.interpolate(planes, size=grid, mode="bilinear", align_corners=False)
            level = planes.reshape(*level.shape[:2], *grid)
        rows = level.permute(0, 2, 3, 1).reshape(-1, 1, level.shape[1])
        pooled.append(F.adaptive_avg_pool1d(rows, embed_dim).squeeze(1))
    stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(len(stacked), -1), grid
