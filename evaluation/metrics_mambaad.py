"""MambaAD-paper metrics: what the authors' configs computed for the published tables.

The MambaAD configs (``configs/mambaad/*.py`` of lewandofskee/MambaAD) run ADer's evaluator
(``util/metric.py``) with ``pooling_ks=None``, ``max_step_aupro=100`` and ADEval off. Per class:

* image label = whether the (binarised, resized) mask has a positive pixel (``gt_px.max``), not the
  data set's ``anomaly`` field, so an anomalous image with an empty mask counts as normal; image
  score = maximum of the map;
* I-AUROC, I-AP, I-F1max (``precision_recall_curve``), P-AUROC and P-AP exactly, with
  scikit-learn: the exact functions of :mod:`evaluation.metrics` give the same values;
* P-F1max over the 21 thresholds ``0, 0.05, ..., 1`` of the class's min-max-normalised maps, as in
  ADer mode (:func:`evaluation.metrics_ader.f1_max_from_counts`);
* AU-PRO over the thresholds ``np.arange(min, max, (max - min) / 100)`` of the class's maps
  (predict ``map > t``): PRO = mean over all 8-connected ground-truth regions of the fraction
  predicted, FPR = false positives / normal pixels. The points with FPR < 0.3 are kept, their
  FPRs rescaled by their own minimum and maximum to [0, 1], and the trapezoidal area taken (their
  ``sklearn.metrics.auc``): no (0, 0) start, no interpolation at 0.3, no division by 0.3.

Where the official code raises or silently returns 0 (no anomalous or no normal pixels, constant
maps, fewer than two AU-PRO points below FPR 0.3), the metric is nan here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.metrics_ader import ADER_F1_THRESHOLDS, f1_max_from_counts, f1_threshold_counts
from evaluation.metrics_exact import (
    METRIC_NAMES,
    as_bool,
    compute_metrics_exact,
    inverse_region_sizes,
    squeeze_channel,
    wanted_metrics,
)

__all__ = ["MAMBAAD_AUPRO_STEPS", "compute_metrics_mambaad", "mambaad_pixel_metrics", "mask_labels"]

MAMBAAD_AUPRO_STEPS = 100
_FPR_LIMIT = 0.3
_OWN_METRICS = ("P-F1max", "AUPRO")


def mask_labels(masks: np.ndarray) -> np.ndarray:
    """Image labels as the official evaluator derives them: 1 where the mask has a positive pixel."""
    return masks.reshape(len(masks), -1).any(axis=1).astype(np.int64)


def _pro_area(fpr: np.ndarray, pro: np.ndarray, limit: float = _FPR_LIMIT) -> float:
    """Their cut-and-rescale area: points with FPR < ``limit`` (0.3), FPR min-max rescaled, trapezoids."""
    keep = fpr < limit
    x, y = fpr[keep], pro[keep]
    if x.size < 2 or not x.max() > x.min():
        return math.nan
    x = (x - x.min()) / (x.max() - x.min())
    # x falls as the threshold rises (their auc() flips the sign), so sum the widths x[i] - x[i+1]
    return float(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:]) / 2.0))


def mambaad_pixel_metrics(
    anomaly_maps: Any,
    masks: np.ndarray,
    steps: int = MAMBAAD_AUPRO_STEPS,
    curves: dict[str, Any] | None = None,
    chunk: int = 32,
    fpr_limit: float = _FPR_LIMIT,
) -> dict[str, float]:
    """P-F1max (21 normalised thresholds) and AU-PRO (``steps`` thresholds) as the authors' code.

    anomaly_maps: [N, H, W] (any float dtype, also a ``np.memmap``), read ``chunk`` images at a
    time in float64; masks: [N, H, W] bool. ``curves``, if given, receives the PRO points of the
    sweep (``pro_fpr`` ascending, before the cut and rescaling) and ``pixel_threshold`` (the
    F1-max cut in map units, predicting ``>``).
    """
    nan = dict.fromkeys(_OWN_METRICS, math.nan)
    lo, hi = float(np.min(anomaly_maps)), float(np.max(anomaly_maps))
    if not hi > lo:
        return nan
    thresholds = np.arange(lo, hi, (hi - lo) / steps)
    n_slots = len(thresholds) + 1
    neg = np.zeros(n_slots)
    pro_weighted = np.zeros(n_slots)
    f1_all = np.zeros(len(ADER_F1_THRESHOLDS) + 1)
    f1_pos = np.zeros(len(ADER_F1_THRESHOLDS) + 1)
    n_regions = 0
    for start in range(0, len(anomaly_maps), chunk):
        x = np.asarray(anomaly_maps[start : start + chunk], dtype=np.float64)
        gt = np.asarray(masks[start : start + chunk], dtype=bool)
        # number of thresholds t with x > t: the pixel is predicted at the first k of them
        k = np.searchsorted(thresholds, x, side="left")
        neg += np.bincount(k[~gt], minlength=n_slots)
        weights, regions = inverse_region_sizes(gt)
        n_regions += regions
        pro_weighted += np.bincount(k[gt], weights=weights, minlength=n_slots)
        chunk_all, chunk_pos = f1_threshold_counts(x, gt, lo, hi)
        f1_all += chunk_all
        f1_pos += chunk_pos
    if not f1_pos.sum():
        return nan
    out = dict(nan)
    out["P-F1max"], best = f1_max_from_counts(f1_pos, f1_all)
    n_neg = neg.sum()
    if n_neg and n_regions:
        fpr = np.cumsum(neg[::-1])[::-1][1:] / n_neg  # one point per threshold, ascending thresholds
        pro = np.cumsum(pro_weighted[::-1])[::-1][1:] / n_regions
        out["AUPRO"] = _pro_area(fpr, pro, fpr_limit)
        if curves is not None:
            curves["pro_fpr"], curves["pro_pro"] = fpr[::-1], pro[::-1]
    if curves is not None:
        curves["pixel_threshold"] = lo + float(ADER_F1_THRESHOLDS[best]) * (hi - lo)
    return out


def compute_metrics_mambaad(
    anomaly_maps: Any,
    masks: Any,
    labels: Any,
    metrics: Sequence[str] | None = None,
    scores: Any = None,
    curves: dict[str, Any] | None = None,
    fpr_limit: float = _FPR_LIMIT,
    aupro_steps: int = MAMBAAD_AUPRO_STEPS,
) -> dict[str, float]:
    """Like :func:`compute_metrics_exact`, computed as the MambaAD paper's evaluator did.

    ``labels`` is not used: the image label is whether the mask has a positive pixel (see the
    module docstring). ``scores`` defaults to the maximum of each map, as there. ``fpr_limit`` and
    ``aupro_steps``: the AU-PRO cut (0.3) and sweep (100 thresholds; ADer's own default is 200).
    """
    del labels  # the official evaluator derives the image labels from the masks
    wanted = wanted_metrics(metrics)
    maps = squeeze_channel(np.asarray(anomaly_maps), "anomaly_maps")
    gts = squeeze_channel(as_bool(masks), "masks")
    exact = [m for m in METRIC_NAMES if m in wanted and m not in _OWN_METRICS]
    results = compute_metrics_exact(maps, gts, mask_labels(gts), metrics=exact, scores=scores, curves=curves)
    if wanted & set(_OWN_METRICS):
        results.update(
            mambaad_pixel_metrics(maps, gts, steps=aupro_steps, curves=curves, fpr_limit=fpr_limit)
        )
    return {name: results[name] for name in METRIC_NAMES if name in wanted}
