"""The evaluation protocol's steps between a method's maps and the metrics: smoothing, resolution,
mask binarisation and the image score.

Papers differ here (docs/metrics.md, "Protocol switches"): MambaAD / ADer score the maximum of the
map (ADer's benchmark pools UniAD's map 16x16 first), Dinomaly and INP-Former the mean of its top
1 %; masks are binarised ``> 0.5`` after a bilinear resize (ADer) or ``> 0`` (Dinomaly); maps are
blurred with scipy's 33-tap Gaussian of sigma 4 (MambaAD, in the method) or a 5x5 one. The
:class:`evaluation.evaluator.ADEvaluator` applies these to each batch before storing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SCORES", "image_scores", "resize_maps", "resize_masks", "smooth_maps"]

# model: the method's own score (its predict); max: the map's maximum; topk_mean: mean of its top
# k %; pooled_max: maximum after a stride-1 average filter of kernel size k (ADer's pooling_ks)
IMAGE_SCORES: tuple[str, ...] = ("model", "max", "topk_mean", "pooled_max")


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``radius`` as scipy's 'reflect' (d c b a | a b c d)."""
    idx = torch.remainder(torch.arange(-radius, n + radius, device=device), 2 * n)
    return torch.where(idx < n, idx, 2 * n - 1 - idx)


def smooth_maps(maps: torch.Tensor, sigma: float, taps: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps with scipy's 'reflect' borders; ``taps`` (odd) is the
    kernel width, None scipy's default ``2 * int(4 * sigma + 0.5) + 1`` (33 taps for sigma 4)."""
    radius = int(4.0 * sigma + 0.5) if taps is None else (taps - 1) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    _, h, w = maps.shape
    out = maps[:, None].index_select(3, _reflect_index(w, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = out.index_select(2, _reflect_index(h, radius, maps.device))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] maps bilinearly resized to ``size`` (align_corners=False, as torchvision's Resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def resize_masks(masks: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """[B, H, W] masks resized bilinearly to ``size`` (as float) and binarised ``> threshold``."""
    soft = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        soft = F.interpolate(soft[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return soft > threshold


def image_scores(maps: torch.Tensor, kind: str, top_percent: float = 1.0, pool: int = 16) -> torch.Tensor:
    """Image scores [B] of [B, H, W] maps: ``max``, ``topk_mean`` (mean of the top ``top_percent``
    % of the pixels, at least one) or ``pooled_max`` (max after a ``pool`` x ``pool`` stride-1 average
    filter without padding, ADer's ``pooling_ks``; the kernel is clipped to the map)."""
    flat = maps.flatten(1)
    if kind == "max":
        return flat.amax(dim=1)
    if kind == "topk_mean":
        k = max(1, int(flat.shape[1] * top_percent / 100.0))
        return flat.topk(k, dim=1).values.mean(dim=1)
    if kind == "pooled_max":
        kernel = (min(pool, maps.shape[-2]), min(pool, maps.shape[-1]))
        return F.avg_pool2d(maps[:, None], kernel, stride=1).flatten(1).amax(dim=1)
    raise ValueError(f"image score {kind!r}: use one of {', '.join(IMAGE_SCORES)}")
