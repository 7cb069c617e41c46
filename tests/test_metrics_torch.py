"""evaluation.metrics_torch gives the numbers of the exact numpy path (evaluation.metrics) on CPU and CUDA."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from evaluation.metrics import compute_metrics
from evaluation.metrics_exact import METRIC_NAMES, _au_pro, _rank, _Ranked, region_weights
from evaluation.metrics_torch import _au_pro as torch_au_pro
from evaluation.metrics_torch import _rank as torch_rank
from evaluation.metrics_torch import compute_metrics_torch
from tests.test_metrics import random_case

TOL = 1e-9  # float64 sums in another order; AUROC is an integer statistic and must match exactly


def assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        elif name.endswith("AUROC"):
            assert got[name] == value, name
        else:
            assert got[name] == pytest.approx(value, abs=TOL), name


def tied_case(seed: int, n: int = 8, size: int = 24) -> tuple[np.ndarray, ...]:
    """Like ``random_case`` but larger, with heavy ties (scores on a 0.05 grid) across both classes."""
    return random_case(seed, n=n, size=size, decimals=1 + seed % 2)


@pytest.mark.parametrize("seed", range(6))
def test_matches_numpy_on_random_data_with_ties(seed: int) -> None:
    maps, masks, labels = tied_case(seed)
    expected = compute_metrics(maps, masks, labels)
    assert not any(math.isnan(v) for v in expected.values())
    assert_same(compute_metrics_torch(torch.from_numpy(maps), torch.from_numpy(masks), labels), expected)
    # numpy inputs, masks as 0/255 bytes, a channel axis, float64 maps
    channel = compute_metrics_torch(maps[:, None], (masks * 255).astype(np.uint8)[:, None], labels)
    assert_same(channel, expected)
    wide = maps.astype(np.float64)
    assert_same(compute_metrics_torch(wide, masks, labels), compute_metrics(wide, masks, labels))


@pytest.mark.parametrize("seed", range(3))
def test_float16_maps_rank_the_stored_values(seed: int) -> None:
    maps, masks, labels = random_case(seed + 20, n=6, size=20, decimals=3)
    maps += np.random.default_rng(seed).random(maps.shape).astype(np.float32) * 1e-3  # float16 merges some
    half = maps.astype(np.float16)
    expected = compute_metrics(half, masks, labels)
    assert_same(compute_metrics_torch(torch.from_numpy(half), torch.from_numpy(masks), labels), expected)
    # the rounding matters (new ties), so this really compares the metrics of the stored float16 values
    assert compute_metrics(maps, masks, labels) != expected


def test_explicit_scores_subsets_and_key_order() -> None:
    maps, masks, labels = tied_case(3)
    scores = maps.mean(axis=(1, 2))
    expected = compute_metrics(maps, masks, labels, scores=scores)
    assert_same(compute_metrics_torch(maps, masks, labels, scores=torch.from_numpy(scores)), expected)
    subset = compute_metrics_torch(maps, masks, labels, metrics=["AUPRO", "I-AP"])
    assert_same(subset, compute_metrics(maps, masks, labels, metrics=["AUPRO", "I-AP"]))
    assert list(subset) == ["I-AP", "AUPRO"]
    assert list(compute_metrics_torch(maps, masks, labels, metrics="P-AP")) == ["P-AP"]
    with pytest.raises(ValueError, match=re.escape(", ".join(METRIC_NAMES))):
        compute_metrics_torch(maps, masks, labels, metrics=["pixel-auc"])


@pytest.mark.parametrize("fpr_limit", [0.3, 0.02, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_au_pro_cut_and_whole_curve(seed: int, fpr_limit: float) -> None:
    maps, masks, _ = tied_case(seed + 5)
    weights = region_weights(masks)
    expected = _au_pro(_rank(maps.reshape(-1), masks.reshape(-1), weights.copy()), fpr_limit)
    ranked = torch_rank(
        torch.from_numpy(maps).reshape(-1), torch.from_numpy(masks).reshape(-1), torch.from_numpy(weights)
    )
    assert torch_au_pro(ranked, fpr_limit) == pytest.approx(expected, abs=TOL)


def test_rank_statistics_equal_numpy() -> None:
    maps, masks, _ = tied_case(1)
    weights = region_weights(masks)
    ref: _Ranked = _rank(maps.reshape(-1), masks.reshape(-1), weights.copy())
    got = torch_rank(
        torch.from_numpy(maps).reshape(-1), torch.from_numpy(masks).reshape(-1), torch.from_numpy(weights)
    )
    assert (got.n_pos, got.n_neg) == (ref.n_pos, ref.n_neg)
    for field in ("neg_sorted", "pos_values", "pos_first", "pos_counts", "neg_lt", "neg_le"):
        assert np.array_equal(getattr(got, field).numpy(), getattr(ref, field)), field
    np.testing.assert_allclose(got.pos_weights.numpy(), ref.pos_weights, rtol=0, atol=1e-15)


def test_all_normal_is_nan_and_all_anomalous_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((3, 8, 8)).astype(np.float32))
    normal = compute_metrics_torch(maps, torch.zeros(3, 8, 8, dtype=torch.bool), torch.zeros(3))
    assert tuple(normal) == METRIC_NAMES and all(math.isnan(v) for v in normal.values())
    ones = torch.ones(3, 8, 8)
    anomalous = compute_metrics_torch(maps, ones, torch.ones(3))
    expected = compute_metrics(maps.numpy(), ones.numpy(), np.ones(3))
    assert_same(anomalous, expected)
    assert math.isnan(anomalous["P-AUROC"]) and math.isnan(anomalous["AUPRO"])
    assert anomalous["P-AP"] == 1.0 and anomalous["P-F1max"] == 1.0


def test_bad_inputs_are_reported() -> None:
    maps, masks, labels = tied_case(0, n=4, size=8)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics_torch(bad, masks, labels)
    with pytest.raises(ValueError, match="differ in shape"):
        compute_metrics_torch(maps, masks[:, :4], labels)
    with pytest.raises(ValueError, match="expected 4 image labels"):
        compute_metrics_torch(maps, masks, labels[:3], scores=maps.max(axis=(1, 2))[:3])


@pytest.mark.cuda
def test_cuda_tensors_give_the_numpy_numbers() -> None:
    for seed in range(3):
        maps, masks, labels = tied_case(seed, n=10, size=64)
        for dtype in (torch.float32, torch.float16):
            t = torch.from_numpy(maps).to(dtype)
            expected = compute_metrics(t.numpy(), masks, labels)
            got = compute_metrics_torch(
                t.to("cuda"), torch.from_numpy(masks).to("cuda"), torch.from_numpy(labels)
            )
            assert_same(got, expected)
    # numpy input on an explicit device
    assert_same(
        compute_metrics_torch(maps, masks, labels, device="cuda"), compute_metrics(maps, masks, labels)
    )
