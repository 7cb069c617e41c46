"""ADer-mode metrics equal a literal, threshold-by-threshold reading of the official definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from evaluation.metrics import compute_metrics
from evaluation.metrics_ader import ader_pixel_metrics, compute_metrics_ader
from evaluation.metrics_exact import METRIC_NAMES


def reference_ader(maps: np.ndarray, masks: np.ndarray, bins: int = 50) -> dict[str, float]:
    """ADEval (CUDA, ``nstrips=bins``) and ADer's F1 loop, written out one threshold at a time.

    Thresholds are the bin edges ``lo + k (hi - lo) / bins``; a pixel counts for threshold k if it is
    ``>=`` the edge, and pixels equal to the maximum count twice below the last edge (they fall in
    the last bin and in the overflow bin). PRO weights pixels by 1 / region size.
    """
    lo, hi = float(maps.min()), float(maps.max())
    regions = []
    for m, g in zip(maps, masks, strict=True):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[lab == k] for k in range(1, n + 1)]
    pos, neg = maps[masks], maps[~masks]

    def count(values: np.ndarray, k: int) -> float:
        edge = lo + k * (hi - lo) / bins
        return float(np.sum(values >= edge) + (np.sum(values == hi) if k < bins else 0))

    n_pos = pos.size + np.sum(pos == hi)
    n_neg = neg.size + np.sum(neg == hi)
    w_total = sum(1.0 + np.sum(r == hi) / r.size for r in regions)
    tpr, fpr, prec, pro = [], [], [], []
    for k in range(bins, -1, -1):  # from the highest edge down: ascending FPR
        tp, fp = count(pos, k), count(neg, k)
        tpr.append(tp / n_pos)
        fpr.append(fp / n_neg)
        prec.append(tp / (tp + fp) if tp + fp > 0 else 1.0)
        pro.append(sum(count(r, k) / r.size for r in regions) / w_total)
    fpr_a, pro_a = np.array(fpr), np.array(pro)
    low = fpr_a <= 0.3
    j = int(low.sum())
    x, y = fpr_a[:j], pro_a[:j]
    y_lim = y[-1] + (pro_a[j] - y[-1]) * (0.3 - x[-1]) / (fpr_a[j] - x[-1])
    aupro = (np.trapezoid(np.r_[y, y_lim], np.r_[x, 0.3])) / 0.3

    norm = (maps - lo) / (hi - lo)
    f1s = []
    for t in np.arange(0.0, 1.0 + 1e-3, 0.05):
        pred = norm > t
        inter = np.logical_and(pred, masks).sum()
        p = inter / (pred.sum() + 1e-8)
        r = inter / (masks.sum() + 1e-8)
        f1s.append(2 * p * r / (p + r + 1e-8))
    return {
        "P-AUROC": float(np.trapezoid(tpr, fpr)),
        "P-AP": float(np.trapezoid(prec, tpr)),
        "P-F1max": float(max(f1s)),
        "AUPRO": float(aupro),
    }


def random_case(seed: int, n: int = 4, size: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):
        r, c = rng.integers(0, size - 4, size=2)
        masks[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
        masks[i, rng.integers(0, size), rng.integers(0, size)] = True
    maps = rng.random((n, size, size)) + rng.uniform(0.2, 0.8) * masks
    labels = masks.reshape(n, -1).any(axis=1).astype(int)
    return maps, masks, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bins", [50, 7])
def test_ader_pixel_metrics_match_reference(seed: int, bins: int) -> None:
    maps, masks, _ = random_case(seed)
    if seed % 2:  # the maximum on an anomalous pixel exercises the double count there
        maps[masks] += maps.max()
    expected = reference_ader(maps, masks, bins)
    got = ader_pixel_metrics(maps, masks, bins=bins, chunk=3)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def test_compute_metrics_ader_keeps_exact_image_metrics() -> None:
    maps, masks, labels = random_case(11, n=6)
    ader = compute_metrics_ader(maps, masks, labels)
    exact = compute_metrics(maps, masks, labels)
    assert tuple(ader) == METRIC_NAMES
    for name in ("I-AUROC", "I-AP", "I-F1max"):
        assert ader[name] == exact[name]
    assert list(compute_metrics_ader(maps, masks, labels, metrics=["AUPRO", "I-AP"])) == ["I-AP", "AUPRO"]


def test_binning_loses_against_exact_when_an_outlier_stretches_the_range() -> None:
    # Anomalous pixels score above every normal pixel except one huge outlier: exactly, the ranking
    # is almost perfect; with 50 bins over [0, 100] everything else shares the first bin.
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 4:8, 4:8] = True
    maps = rng.random((2, 16, 16)) * 0.5 + 0.5 * masks
    maps[1, 0, 0] = 100.0
    labels = np.array([1, 0])
    exact = compute_metrics(maps, masks, labels)
    ader = compute_metrics_ader(maps, masks, labels)
    assert exact["P-AUROC"] > 0.99 and exact["AUPRO"] > 0.95 and exact["P-F1max"] > 0.95
    assert ader["P-AUROC"] < exact["P-AUROC"] - 0.3
    assert ader["AUPRO"] < exact["AUPRO"] - 0.3
    assert ader["P-F1max"] < exact["P-F1max"] - 0.5


def test_well_spread_scores_are_close_to_exact() -> None:
    maps, masks, labels = random_case(3, n=12, size=32)
    exact = compute_metrics(maps, masks, labels)
    ader = compute_metrics_ader(maps, masks, labels)
    assert ader["P-AUROC"] == pytest.approx(exact["P-AUROC"], abs=0.01)
    assert ader["AUPRO"] == pytest.approx(exact["AUPRO"], abs=0.05)


def test_undefined_cases_are_nan() -> None:
    maps = np.random.default_rng(1).random((2, 8, 8))
    assert all(math.isnan(v) for v in ader_pixel_metrics(maps, np.zeros_like(maps, bool)).values())
    assert all(math.isnan(v) for v in ader_pixel_metrics(np.ones((2, 8, 8)), maps > 0.5).values())
