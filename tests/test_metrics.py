"""Tests for evaluation.metrics (exact mode) against scikit-learn and a slow, direct AU-PRO reference."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from evaluation.metrics import compute_metrics
from evaluation.metrics_exact import (
    METRIC_NAMES,
    SAMPLE_METRIC_NAMES,
    _split,
    add_mad,
    au_pro,
    average_over_classes,
    average_precision,
    f1_max,
    roc_auc,
)
from evaluation.report import format_table


def sk_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def reference_au_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Straightforward MVTec-style AU-PRO: loop over every distinct threshold."""
    regions = []
    for m, mask in zip(maps, masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [m[lab == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(np.count_nonzero(normal >= t) / normal.size)
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    x, y = np.array(xs), np.array(ys)
    keep = x <= fpr_limit
    xk, yk = x[keep], y[keep]
    if xk[-1] < fpr_limit:
        j = int(keep.sum())  # first point beyond the limit (x is non-decreasing)
        xk = np.r_[xk, fpr_limit]
        yk = np.r_[yk, np.interp(fpr_limit, x[j - 1 : j + 1], y[j - 1 : j + 1])]
    return float(np.trapezoid(yk, xk) / fpr_limit)


def random_case(seed: int, n: int = 4, size: int = 12, decimals: int = 1) -> tuple[np.ndarray, ...]:
    """Maps with tied scores, masks with a few blobs (some images normal), matching labels."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 4, size=2)
            masks[i, r : r + h, c : c + w] = True
        masks[i] &= rng.random((size, size)) < 0.85  # ragged blobs, sometimes only diagonally linked
    maps = rng.random((n, size, size)) + 0.5 * masks
    maps = np.round(maps / 1.5, decimals).astype(np.float32)
    labels = masks.reshape(n, -1).any(axis=1).astype(int)
    return maps, masks, labels


@pytest.mark.parametrize("seed", range(6))
def test_ranking_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = np.round(rng.random(n) + 0.4 * labels, 2 if seed % 2 else 1)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-6
    )
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(labels, scores), abs=1e-6)


def test_ranking_metrics_all_tied_and_degenerate() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.full(5, 0.3)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(labels, scores))
    assert math.isnan(roc_auc(scores, np.zeros(5)))
    assert math.isnan(average_precision(scores, np.zeros(5)))
    assert math.isnan(f1_max(scores, np.zeros(5)))
    assert math.isnan(roc_auc(scores, np.ones(5)))
    assert average_precision(scores, np.ones(5)) == pytest.approx(average_precision_score(np.ones(5), scores))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_au_pro_matches_reference(seed: int, fpr_limit: float) -> None:
    maps, masks, _ = random_case(seed, decimals=1 + seed % 2)
    expected = reference_au_pro(maps, masks, fpr_limit)
    assert au_pro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-4)


def test_au_pro_perfect_detector_is_one() -> None:
    _, masks, _ = random_case(7)
    maps = np.where(masks, 0.9, 0.1) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert au_pro(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_au_pro_hand_computed_two_images() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    # Image A: region r1 = two diagonal pixels (one region under 8-connectivity), scores 0.9 and 0.5;
    # one normal pixel at 0.6. Image B: region r2 = pixels scoring 0.4 and 0.0; one normal at 0.45.
    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3] = 0.9, 0.5, 0.6
    masks[1, 2, 1] = masks[1, 2, 2] = True
    maps[1, 2, 1], maps[1, 0, 3] = 0.4, 0.45
    # 28 normal pixels, R = 2. Curve (FPR, PRO) over thresholds 0.9, 0.6, 0.5, 0.45, 0.4, 0.0:
    # (0,0) (0,.25) (1/28,.25) (1/28,.5) (2/28,.5) (2/28,.75) (1,1).
    # Area to 0.3: .25/28 + .5/28 + trapezoid from (2/28, .75) to (0.3, y), y interpolated on the
    # last segment: y = .75 + .25 * (0.3 - 2/28) / (1 - 2/28).
    y = 0.75 + 0.25 * (0.3 - 2 / 28) / (1 - 2 / 28)
    expected = (0.25 / 28 + 0.5 / 28 + 0.5 * (0.75 + y) * (0.3 - 2 / 28)) / 0.3
    assert au_pro(maps, masks) == pytest.approx(expected, abs=1e-9)
    # Whole curve: .25/28 + .5/28 + (1 - 2/28) * (.75 + 1) / 2.
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(
        0.25 / 28 + 0.5 / 28 + (1 - 2 / 28) * 0.875, abs=1e-9
    )


def test_au_pro_uses_eight_connectivity() -> None:
    # (0,0) touches (1,1) only diagonally: one region of 3 pixels, not {(0,0)} and {(1,1),(1,2)}.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1.0
    # Curve (0,0) (0,1/3) (1,1): area (1/3 + 1) / 2. Two regions would give (0,.5) and 0.75.
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx((1 / 3 + 1) / 2, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_compute_metrics_matches_independent_computations(seed: int) -> None:
    maps, masks, labels = random_case(seed + 10, n=6)
    out = compute_metrics(maps, masks, labels)
    assert tuple(out) == METRIC_NAMES
    img_scores = maps.reshape(len(maps), -1).max(axis=1)
    expected = {
        "I-AUROC": roc_auc_score(labels, img_scores),
        "I-AP": average_precision_score(labels, img_scores),
        "I-F1max": sk_f1_max(labels, img_scores),
        "P-AUROC": roc_auc_score(masks.ravel(), maps.ravel()),
        "P-AP": average_precision_score(masks.ravel(), maps.ravel()),
        "P-F1max": sk_f1_max(masks.ravel(), maps.ravel()),
        "AUPRO": reference_au_pro(maps, masks),
    }
    for name in METRIC_NAMES:
        assert out[name] == pytest.approx(expected[name], abs=1e-6), name
        assert 0.0 <= out[name] <= 1.0


def test_compute_metrics_explicit_scores_and_torch_input() -> None:
    maps, masks, labels = random_case(3, n=5)
    scores = maps.mean(axis=(1, 2))
    out = compute_metrics(maps, masks, labels, scores=scores)
    assert out["I-AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    as_torch = compute_metrics(
        torch.from_numpy(maps),
        torch.from_numpy(masks),
        torch.from_numpy(labels),
        scores=torch.from_numpy(scores),
    )
    assert as_torch == pytest.approx(out, abs=1e-12)
    with_channel = compute_metrics(maps[:, None], masks[:, None].astype(np.uint8), labels, scores=scores)
    assert with_channel == pytest.approx(out, abs=1e-12)


def test_compute_metrics_subset_and_unknown_name() -> None:
    maps, masks, labels = random_case(4)
    out = compute_metrics(maps, masks, labels, metrics=["AUPRO", "I-AUROC"])
    assert list(out) == ["I-AUROC", "AUPRO"]
    assert out["AUPRO"] == pytest.approx(reference_au_pro(maps, masks), abs=1e-6)
    assert out["I-AUROC"] == pytest.approx(roc_auc_score(labels, maps.max(axis=(1, 2))), abs=1e-6)
    with pytest.raises(ValueError, match=re.escape(", ".join(METRIC_NAMES))):
        compute_metrics(maps, masks, labels, metrics=["P-AUROC", "pixel-auc"])


def test_compute_metrics_all_normal_returns_nan() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    out = compute_metrics(maps, np.zeros((3, 8, 8), dtype=bool), np.zeros(3, dtype=int))
    assert tuple(out) == METRIC_NAMES
    assert all(math.isnan(v) for v in out.values())


def test_compute_metrics_all_anomalous_pixels() -> None:
    maps = np.random.default_rng(1).random((2, 4, 4))
    out = compute_metrics(maps, np.ones((2, 4, 4)), np.ones(2))
    assert math.isnan(out["I-AUROC"]) and math.isnan(out["P-AUROC"]) and math.isnan(out["AUPRO"])
    assert out["P-AP"] == pytest.approx(average_precision_score(np.ones(32), maps.ravel()))


def test_format_table_and_average() -> None:
    rng = np.random.default_rng(5)
    per_class = {name: dict(zip(METRIC_NAMES, rng.random(len(METRIC_NAMES)))) for name in ("bottle", "cable")}
    per_class["screw"] = {**dict(zip(METRIC_NAMES, rng.random(len(METRIC_NAMES)))), "I-AP": math.nan}
    matrix = np.array([[row[m] for m in METRIC_NAMES] for row in per_class.values()])
    col_mean = np.nanmean(matrix, axis=0)

    mean = average_over_classes(per_class)
    assert list(mean) == [*METRIC_NAMES, "mAD"]
    assert [mean[m] for m in METRIC_NAMES] == pytest.approx(col_mean.tolist())
    assert mean["mAD"] == pytest.approx(col_mean.mean())

    table = format_table(per_class, {"screw": {"I-AP": "has no anomalous test image"}})
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["class", *METRIC_NAMES, "mAD"]
    assert len(lines) == 2 + len(per_class) + 1 + 3  # a blank line and two notes
    mean_cells = [c.strip() for c in lines[5].strip("|").split("|")]
    assert mean_cells == ["mean", *(f"{100 * v:.2f}" for v in [*col_mean, col_mean.mean()])]
    bottle_cells = [c.strip() for c in lines[2].strip("|").split("|")]
    bottle = matrix[0]
    assert bottle_cells == ["bottle", *(f"{100 * v:.2f}" for v in [*bottle, bottle.mean()])]
    screw_cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert screw_cells[2] == "n/a" and screw_cells[-1] == "n/a"  # I-AP, and so mAD, undefined
    assert lines[6:] == [
        "",
        "* mean of I-AP over 2 of 3 classes (screw has no anomalous test image)",
        "* mAD is n/a for screw (not all seven metrics defined); the mean row's mAD is the mean of its "
        "seven means",
    ]
    assert "(screw gives no defined value)" in format_table(per_class)
    assert "n/a" not in format_table({k: v for k, v in per_class.items() if k != "screw"})


def test_add_mad_orders_metrics_and_averages_them() -> None:
    row = {"P-AUROC": 0.5, "I-AUROC": 1.0, "AUPRO": 0.6}
    out = add_mad(row)
    assert list(out) == ["I-AUROC", "P-AUROC", "AUPRO", "mAD"]
    assert out["mAD"] == pytest.approx(0.7)


def test_mad_of_a_row_with_an_undefined_metric_is_undefined() -> None:
    # averaging the remaining metrics would silently compare means over different metric sets
    assert math.isnan(add_mad({"P-AUROC": 0.5, "I-AUROC": 1.0, "AUPRO": math.nan})["mAD"])


def test_sample_columns_follow_mad_and_are_not_averaged_into_it() -> None:
    row = {**dict.fromkeys(METRIC_NAMES, 0.5), "S-AUROC": 1.0, "S-AP": 0.0, "S-F1max": 0.25}
    out = add_mad(row)
    assert list(out) == [*METRIC_NAMES, "mAD", *SAMPLE_METRIC_NAMES]
    assert out["mAD"] == pytest.approx(0.5)
    plain = {name: dict.fromkeys(METRIC_NAMES, 0.7) for name in ("a",)}
    assert "S-AUROC" not in format_table(plain)
    lines = format_table({"a": row, "b": dict.fromkeys(METRIC_NAMES, 0.7)}).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "class",
        *METRIC_NAMES,
        "mAD",
        *SAMPLE_METRIC_NAMES,
    ]
    assert lines[2].split("|")[-2].strip() == "25.00" and lines[3].split("|")[-2].strip() == "n/a"
    mean = average_over_classes({"a": row, "b": dict.fromkeys(METRIC_NAMES, 0.7)})
    assert mean["S-AUROC"] == 1.0 and mean["mAD"] == pytest.approx(0.6)


def test_chunked_split_and_float16_maps_match_float32() -> None:
    rng = np.random.default_rng(9)
    scores = rng.random(1000).astype(np.float16)
    positive = rng.random(1000) < 0.3
    pos, neg = _split(scores, positive, chunk=7)
    assert pos.dtype == np.float32 and np.array_equal(pos, scores[positive].astype(np.float32))
    assert np.array_equal(neg, scores[~positive].astype(np.float32))
    maps, masks, labels = random_case(2, decimals=3)
    half = maps.astype(np.float16)
    assert compute_metrics(half, masks, labels) == pytest.approx(
        compute_metrics(half.astype(np.float32), masks, labels), abs=1e-12
    )
