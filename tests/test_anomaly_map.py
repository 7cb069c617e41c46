"""Anomaly maps, Gaussian blur (against scipy) and the training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from loss.feature_mse import FeatureMSELoss
from model.anomaly_map import anomaly_maps_and_scores, cosine_anomaly_map, gaussian_blur


@pytest.mark.parametrize("shape", [(2, 64, 48), (1, 9, 13)])
def test_gaussian_blur_matches_scipy(shape: tuple[int, int, int]) -> None:
    x = torch.rand(*shape, dtype=torch.float64)
    ref = np.stack([gaussian_filter(m, sigma=4) for m in x.numpy()])
    np.testing.assert_allclose(gaussian_blur(x, 4.0).numpy(), ref, atol=1e-7)


def test_cosine_map_is_zero_for_identical_and_sums_scales() -> None:
    f = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    assert cosine_anomaly_map(f, f, (8, 8)).abs().max() < 1e-6
    g = [-f[0], f[1]]  # opposite at scale 0: 1 - cos = 2 everywhere
    amap = cosine_anomaly_map(f, g, (8, 8))
    assert amap.shape == (2, 8, 8)
    assert torch.allclose(amap, torch.full_like(amap, 2.0), atol=1e-5)


def test_upsampling_is_bilinear_align_corners() -> None:
    ft = torch.randn(1, 4, 3, 3)
    fs = torch.randn(1, 4, 3, 3)
    raw = (1 - F.cosine_similarity(ft, fs, dim=1)).unsqueeze(1)
    expected = F.interpolate(raw, size=(7, 7), mode="bilinear", align_corners=True).squeeze(1)
    assert torch.allclose(cosine_anomaly_map([ft], [fs], (7, 7)), expected, atol=1e-6)
    assert torch.allclose(cosine_anomaly_map([ft], [fs], (7, 7))[0, ::3, ::3], raw[0, 0], atol=1e-6)


def test_scores_are_map_maxima() -> None:
    f = [torch.randn(3, 8, 4, 4)]
    g = [torch.randn(3, 8, 4, 4)]
    maps, scores = anomaly_maps_and_scores(f, g, (16, 16), sigma=4.0)
    assert maps.shape == (3, 16, 16)
    assert torch.equal(scores, maps.flatten(1).max(dim=1).values)


def test_feature_mse_loss_sums_scales_with_weight() -> None:
    t = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    s = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    expected = 5.0 * sum(torch.mean((a - b) ** 2) for a, b in zip(t, s, strict=True))
    assert torch.allclose(FeatureMSELoss(5.0)(t, s), expected)
    with pytest.raises(ValueError, match="scales"):
        FeatureMSELoss()(t, s[:1])
