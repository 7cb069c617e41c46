"""Anomaly maps from teacher/student features (paper section 3.4, spec section 4).

map = sum over scales of (1 - cosine similarity over channels), each bilinearly
upsampled (align_corners=True) to the input size, then a Gaussian blur with sigma 4
that matches ``scipy.ndimage.gaussian_filter`` (truncate 4, 'reflect' borders).
The image score is the maximum of the blurred map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from util.precision import at_least_float32


def cosine_anomaly_map(
    feats_t: Sequence[torch.Tensor], feats_s: Sequence[torch.Tensor], out_size: tuple[int, int]
) -> torch.Tensor:
    """Sum of per-scale ``1 - cos(f_t, f_s)`` maps, upsampled to ``out_size``: [B, H, W]."""
    total = None
    for ft, fs in zip(feats_t, feats_s, strict=True):
        amap = 1.0 - F.cosine_similarity(at_least_float32(ft), at_least_float32(fs), dim=1)
        amap = F.interpolate(amap.unsqueeze(1), size=out_size, mode="bilinear", align_corners=True)
        total = amap if total is None else total + amap
    if total is None:
        raise ValueError("no feature scales given")
    return total.squeeze(1)


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``radius`` with scipy's 'reflect' (d c b a | a b c d)."""
    idx = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx < n, idx, period - 1 - idx)


def gaussian_kernel1d(
    sigma: float, truncate: float = 4.0, device: torch.device | None = None
) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)``, as scipy uses."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps with scipy-compatible 'reflect' borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate, maps.device).to(maps.dtype)
    radius = (kernel.numel() - 1) // 2
    _, h, w = maps.shape
    x = maps.unsqueeze(1)
    x = x.index_select(3, _reflect_index(w, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _reflect_index(h, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_maps_and_scores(
    feats_t: Sequence[torch.Tensor],
    feats_s: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurred anomaly maps [B, H, W] and image scores [B] (max of each map)."""
    maps = gaussian_blur(cosine_anomaly_map(feats_t, feats_s, out_size), sigma)
    return maps, maps.flatten(1).amax(dim=1)


__all__ = ["anomaly_maps_and_scores", "cosine_anomaly_map", "gaussian_blur", "gaussian_kernel1d"]
