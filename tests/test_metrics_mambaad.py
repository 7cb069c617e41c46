"""MambaAD-mode metrics on small cases computed by hand from the authors' definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import compute_metrics
from evaluation.metrics_exact import METRIC_NAMES
from evaluation.metrics_mambaad import compute_metrics_mambaad, mambaad_pixel_metrics, mask_labels


def pro_case() -> tuple[np.ndarray, np.ndarray]:
    """Two 2x4 maps on [0, 1], so the 100 AU-PRO thresholds are 0, 0.01, ..., 0.99.

    Regions: {0.905, 0.505} in image 0 and {0.705} in image 1. The 13 normal pixels score
    1.0, 0.505, 0.205, 0.205 and 0 (nine times). FPR is 4/13 >= 0.3 below t = 0.205 (cut),
    2/13 up to t = 0.50 (PRO 1) and 1/13 from t = 0.51 on (PRO 0.75, then 0.25, then 0).
    Rescaled, 2/13 -> 1 and 1/13 -> 0: one trapezoid of width 1, heights 1 and 0.75, area 0.875.
    """
    maps = np.array(
        [
            [[0.905, 0.505, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
            [[0.505, 0.205, 0.205, 0.0], [0.0, 0.0, 0.0, 0.705]],
        ]
    )
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, :2] = True
    masks[1, 1, 3] = True
    return maps, masks


def test_au_pro_is_the_cut_and_rescaled_100_step_area() -> None:
    maps, masks = pro_case()
    assert mambaad_pixel_metrics(maps, masks)["AUPRO"] == pytest.approx(0.875, abs=1e-12)
    # the same area without rescaling would be 0.875 / 13 / 0.3; the exact mode interpolates at 0.3
    assert compute_metrics(maps, masks, [1, 1])["AUPRO"] != pytest.approx(0.875, abs=1e-3)


def test_au_pro_drops_the_points_at_fpr_exactly_03() -> None:
    # 10 normal pixels, three of them above 0 (1.0, 0.505, 0.205): FPR is 3/10 = 0.3 below
    # t = 0.205, which ``fpr < 0.3`` drops; keeping it would rescale 0.3 -> 1 and give 0.9375
    # the same regions as pro_case (the second one now two pixels of 0.705: same PRO)
    maps = np.array(
        [[[0.905, 0.505, 1.0, 0.0, 0.0, 0.0, 0.0]], [[0.505, 0.205, 0.0, 0.0, 0.0, 0.705, 0.705]]]
    )
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, :2] = True
    masks[1, 0, 5:] = True
    assert np.count_nonzero(~masks) == 10
    assert mambaad_pixel_metrics(maps, masks)["AUPRO"] == pytest.approx(0.875, abs=1e-12)


def test_pixel_f1_max_uses_21_thresholds_of_the_normalised_map() -> None:
    # normalised: [1, 0.43, 0.42, 0]; anomalous: the first two pixels
    maps = np.array([[[15.0, 9.3, 9.2, 5.0]]])
    masks = np.array([[[True, True, False, False]]])
    # t = 0.40 predicts three pixels, two of them anomalous; t = 0.45 only one (F1 2/3)
    p, r = 2 / (3 + 1e-8), 2 / (2 + 1e-8)  # with their 1e-8 terms
    expected = 2 * p * r / (p + r + 1e-8)
    got = mambaad_pixel_metrics(maps, masks)["P-F1max"]
    assert got == pytest.approx(expected, abs=1e-10)
    assert got < 0.81  # the exact F1-max separates 0.43 from 0.42: 1.0
    assert compute_metrics(maps, masks, [1])["P-F1max"] == pytest.approx(1.0)


def test_image_label_comes_from_the_mask_not_the_labels() -> None:
    maps = np.zeros((3, 4, 4))
    masks = np.zeros((3, 4, 4), dtype=bool)
    maps[0, 1, 1], masks[0, 1, 1] = 0.9, True  # anomalous with a defect mask
    maps[1, 2, 2] = 0.1  # labelled anomalous below, but its mask is empty
    maps[2, 0, 0] = 0.5  # normal
    labels = np.array([1, 1, 0])
    assert mask_labels(masks).tolist() == [1, 0, 0]
    got = compute_metrics(maps, masks, labels, mode="mambaad")
    # by the masks image 0 (score 0.9) outranks both normals; by the labels, image 1 (0.1)
    # loses against image 2 (0.5): AUROC 1/2, AP (1 + 2/3) / 2
    assert got["I-AUROC"] == 1.0 and got["I-AP"] == 1.0 and got["I-F1max"] == 1.0
    exact = compute_metrics(maps, masks, labels)
    assert exact["I-AUROC"] == 0.5 and exact["I-AP"] == pytest.approx(5 / 6)


def test_other_metrics_are_the_exact_ones_and_the_public_function_dispatches() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[:3, 4:9, 5:10] = True
    maps = rng.random((6, 16, 16)) + 0.4 * masks
    labels = mask_labels(masks)
    got = compute_metrics(maps, masks, labels, mode="mambaad")
    assert tuple(got) == METRIC_NAMES
    assert got == compute_metrics_mambaad(maps, masks, labels)
    exact = compute_metrics(maps, masks, labels)
    for name in ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP"):
        assert got[name] == exact[name], name
    assert list(compute_metrics(maps, masks, labels, metrics=["AUPRO", "I-AP"], mode="mambaad")) == [
        "I-AP",
        "AUPRO",
    ]
    with pytest.raises(ValueError, match="mode"):
        compute_metrics(maps, masks, labels, mode="adeval")


def test_curves_hold_the_sweep_and_the_f1_cut() -> None:
    maps, masks = pro_case()
    curves: dict = {}
    compute_metrics(maps, masks, [1, 1], mode="mambaad", curves=curves)
    assert len(curves["pro_fpr"]) == 100 and np.all(np.diff(curves["pro_fpr"]) >= 0)
    assert curves["pro_fpr"][-1] == pytest.approx(4 / 13)  # t = 0: the four normal pixels above 0
    assert 0.0 <= curves["pixel_threshold"] <= 1.0


def test_undefined_cases_are_nan() -> None:
    maps, masks = pro_case()
    assert all(math.isnan(v) for v in mambaad_pixel_metrics(maps, np.zeros_like(masks)).values())
    assert all(math.isnan(v) for v in mambaad_pixel_metrics(np.ones_like(maps), masks).values())
    # every normal pixel above every threshold: no point below FPR 0.3
    flat = np.where(masks, 0.5, 1.0)
    flat[0, 1, 1] = 0.0
    assert math.isnan(mambaad_pixel_metrics(flat, masks)["AUPRO"])
