"""ADer-benchmark pixel metrics: ADEval's 50-bin approximations (ADer with ``use_adeval=True``).

The official ADer evaluator (``util/metric.py`` with ``use_adeval``) computes, per class:

* P-AUROC, P-AP and AU-PRO from ADEval's CUDA histogram accumulator with ``nstrips=50``: the
  class's maps are binned into 50 equal-width bins between their minimum and maximum (plus an
  underflow and an overflow bin), and every curve is evaluated only at the 51 bin edges
  ``t_k = min + k (max - min) / 50`` (predict ``>= t_k``). ROC and PR areas are trapezoids over
  those points (no (0, 0) start point; precision is 1 where nothing is predicted). AU-PRO weights
  each anomalous pixel by ``1 / |region|`` (8-connected), takes the trapezoids with FPR <= 0.3 and
  interpolates linearly to 0.3, / 0.3. ``torch.histc`` puts values equal to the maximum into the
  last bin while the overflow bin counts values ``>= max`` again, so maximum-valued pixels count
  twice; this quirk is reproduced.
* P-F1max over 21 thresholds ``0, 0.05, ..., 1`` of the class's min-max-normalised maps, predicting
  ``norm > t``, with ``precision = I / (pred + 1e-8)``, ``recall = I / (gt + 1e-8)`` and
  ``F1 = 2PR / (P + R + 1e-8)``.

This is what ADer's benchmark configs (``configs/benchmark/*``, ``use_adeval=True``) computed; the
MambaAD paper's own configs left ADEval off (see :mod:`evaluation.metrics_mambaad`).
Image-level (and sample-level) metrics were computed exactly with scikit-learn there, so they use
the exact functions of :mod:`evaluation.metrics` here too (with the data set's image labels; ADer took
the label from the mask, which differs only for anomalous images with an empty mask). Bin
indices are computed in float64 as ``floor((x - min) * 50 / (max - min))``; values within rounding
error of a bin edge may land in the neighbouring bin compared with the GPU kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.metrics_exact import (
    METRIC_NAMES,
    as_bool,
    compute_metrics_exact,
    inverse_region_sizes,
    squeeze_channel,
    wanted_metrics,
)

__all__ = [
    "ADER_BINS",
    "ADER_F1_THRESHOLDS",
    "ader_pixel_metrics",
    "compute_metrics_ader",
    "f1_max_from_counts",
    "f1_threshold_counts",
]

ADER_BINS = 50
ADER_F1_THRESHOLDS = np.arange(0.0, 1.0 + 1e-3, 0.05)  # the same 21 floats as the official code
_EPS = 1e-8
_FPR_LIMIT = 0.3
_PIXEL_METRICS = ("P-AUROC", "P-AP", "P-F1max", "AUPRO")


@dataclass
class _Histograms:
    """Counts per histogram slot (underflow, ``bins`` bins, overflow) and per F1 threshold slot."""

    pos: np.ndarray
    neg: np.ndarray
    pos_weighted: np.ndarray
    n_regions: int
    f1_pos: np.ndarray  # anomalous pixels by number of F1 thresholds strictly below their norm
    f1_all: np.ndarray


def _slots(x: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram slot of each value (0 = below ``lo``) and whether it also counts as overflow."""
    idx = np.floor((x - lo) * (bins / (hi - lo)))
    np.clip(idx, -1, bins - 1, out=idx)
    slot = idx.astype(np.int64) + 1
    slot[x > hi] = bins + 1  # beyond the range: overflow only
    return slot, x >= hi


def _accumulate(
    maps: np.ndarray, masks: np.ndarray, lo: float, hi: float, bins: int, chunk: int
) -> _Histograms:
    n_slots = bins + 2
    h = _Histograms(
        pos=np.zeros(n_slots),
        neg=np.zeros(n_slots),
        pos_weighted=np.zeros(n_slots),
        n_regions=0,
        f1_pos=np.zeros(len(ADER_F1_THRESHOLDS) + 1),
        f1_all=np.zeros(len(ADER_F1_THRESHOLDS) + 1),
    )
    for start in range(0, len(maps), chunk):
        x = np.asarray(maps[start : start + chunk], dtype=np.float64)
        gt = np.asarray(masks[start : start + chunk], dtype=bool)
        slot, over = _slots(x, lo, hi, bins)
        weights, n_regions = inverse_region_sizes(gt)
        h.n_regions += n_regions
        pos_slot, neg_slot = slot[gt], slot[~gt]
        h.pos += np.bincount(pos_slot, minlength=n_slots)
        h.neg += np.bincount(neg_slot, minlength=n_slots)
        h.pos_weighted += np.bincount(pos_slot, weights=weights, minlength=n_slots)
        over_pos = over[gt]
        h.pos[-1] += np.count_nonzero(over_pos)
        h.neg[-1] += np.count_nonzero(over[~gt])
        h.pos_weighted[-1] += weights[over_pos].sum()
        del slot, over, pos_slot, neg_slot
        f1_all, f1_pos = f1_threshold_counts(x, gt, lo, hi)
        h.f1_all += f1_all
        h.f1_pos += f1_pos
    return h


def f1_threshold_counts(x: np.ndarray, gt: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """All and anomalous pixels of a chunk by the number of F1 thresholds below their normalised value.

    A pixel with count ``k`` is predicted (``norm > t``) at the first ``k`` of ``ADER_F1_THRESHOLDS``;
    ``x`` is float64, normalised as the official code does, ``(x - min) / (max - min)``.
    """
    k = np.searchsorted(ADER_F1_THRESHOLDS, (x - lo) / (hi - lo), side="left")
    n = len(ADER_F1_THRESHOLDS) + 1
    return np.bincount(k.ravel(), minlength=n), np.bincount(k[gt], minlength=n)


def f1_max_from_counts(f1_pos: np.ndarray, f1_all: np.ndarray) -> tuple[float, int]:
    """The official 21-threshold F1-max (with its 1e-8 terms) from summed ``f1_threshold_counts``.

    Returns the F1 and the index of its threshold in ``ADER_F1_THRESHOLDS``.
    """
    inter = np.cumsum(f1_pos[::-1])[::-1][1:]  # anomalous pixels predicted at threshold j
    pred = np.cumsum(f1_all[::-1])[::-1][1:]
    p = inter / (pred + _EPS)
    r = inter / (f1_pos.sum() + _EPS)
    f1 = 2 * p * r / (p + r + _EPS)
    best = int(np.argmax(f1))
    return float(f1[best]), best


def _curve(stat: np.ndarray) -> tuple[np.ndarray, float]:
    """Counts ``>= t_k`` for the ``bins + 1`` bin edges (ascending) and the total."""
    cum = np.cumsum(stat)
    return cum[-1] - cum[:-1], float(cum[-1])


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _au_pro_from_curve(fpr: np.ndarray, pro: np.ndarray, limit: float = _FPR_LIMIT) -> float:
    """Trapezoids of the points with FPR <= ``limit`` (0.3) plus the one interpolated up to it, / it."""
    fpr, pro = fpr[::-1], pro[::-1]  # ascending FPR
    low = fpr <= limit
    n_low = int(np.count_nonzero(low))
    area = _trapezoid(pro[:n_low], fpr[:n_low])
    x1, y1 = (fpr[n_low - 1], pro[n_low - 1]) if n_low else (0.0, 0.0)
    if n_low < len(fpr):
        x2, y2 = fpr[n_low], pro[n_low]
        y_lim = y1 + (y2 - y1) * (limit - x1) / (x2 - x1)
        area += 0.5 * (y1 + y_lim) * (limit - x1)
    return area / limit


def ader_pixel_metrics(
    anomaly_maps: Any,
    masks: Any,
    bins: int = ADER_BINS,
    curves: dict[str, Any] | None = None,
    chunk: int = 32,
    fpr_limit: float = _FPR_LIMIT,
) -> dict[str, float]:
    """P-AUROC, P-AP, P-F1max and AU-PRO (area up to ``fpr_limit``) as the official ADer/ADEval code
    computes them.

    anomaly_maps: [N, H, W] (any float dtype, also a ``np.memmap``); masks: [N, H, W] bool. Images
    are processed ``chunk`` at a time, so memory stays at a few chunks. nan where undefined (no
    anomalous pixels, no normal pixels for AUROC/AU-PRO, or constant maps). ``curves``, if given,
    receives the histogram ROC/PR/PRO points and ``pixel_threshold`` (the F1-max cut in map units,
    predicting ``>``).
    """
    maps = anomaly_maps
    lo, hi = float(np.min(maps)), float(np.max(maps))
    nan = dict.fromkeys(_PIXEL_METRICS, math.nan)
    if not hi > lo:
        return nan
    h = _accumulate(maps, masks, lo, hi, bins, chunk)
    tp, n_pos = _curve(h.pos)
    fp, n_neg = _curve(h.neg)
    tp_w, total_w = _curve(h.pos_weighted)
    if n_pos == 0:
        return nan
    out = dict(nan)
    recall = tp / n_pos
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
    out["P-AP"] = _trapezoid(precision[::-1], recall[::-1])

    # the true pixel counts: the histogram quirk does not apply to F1
    out["P-F1max"], best = f1_max_from_counts(h.f1_pos, h.f1_all)

    if n_neg > 0:
        fpr = fp / n_neg
        out["P-AUROC"] = _trapezoid(recall[::-1], fpr[::-1])
        if h.n_regions:
            out["AUPRO"] = float(_au_pro_from_curve(fpr, tp_w / total_w, fpr_limit))
    if curves is not None:
        curves["pixel_threshold"] = lo + float(ADER_F1_THRESHOLDS[best]) * (hi - lo)
        curves["pixel_pr_recall"], curves["pixel_pr_precision"] = recall[::-1], precision[::-1]
        if n_neg > 0:
            curves["pixel_roc_fpr"], curves["pixel_roc_tpr"] = fpr[::-1], recall[::-1]
            if h.n_regions:
                curves["pro_fpr"], curves["pro_pro"] = fpr[::-1], (tp_w / total_w)[::-1]
    return out


def compute_metrics_ader(
    anomaly_maps: Any,
    masks: Any,
    labels: Any,
    metrics: Sequence[str] | None = None,
    scores: Any = None,
    curves: dict[str, Any] | None = None,
    fpr_limit: float = _FPR_LIMIT,
) -> dict[str, float]:
    """Like :func:`compute_metrics_exact`, with the pixel metrics computed the ADer way."""
    wanted = wanted_metrics(metrics)
    image = [m for m in METRIC_NAMES if m in wanted and m not in _PIXEL_METRICS]
    results = compute_metrics_exact(anomaly_maps, masks, labels, metrics=image, scores=scores, curves=curves)
    if wanted & set(_PIXEL_METRICS):
        gts = squeeze_channel(as_bool(masks), "masks")
        maps = squeeze_channel(np.asarray(anomaly_maps), "anomaly_maps")
        results.update(ader_pixel_metrics(maps, gts, curves=curves, fpr_limit=fpr_limit))
    return {name: results[name] for name in METRIC_NAMES if name in wanted}
