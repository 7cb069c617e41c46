"""Metrics beyond the seven, from other frameworks: ADer's P-mIoU-max, anomalib's AUPIMO, MVTec AD 2's SegF1.

Each reads one class's maps ``chunk`` images at a time (a ``np.memmap`` stays on disk), so memory
is a few chunks plus the masks the evaluator already unpacks, as for the other metrics.

* ``P-mIoU-max`` (ADer's ``util/metric.py``, ``mIoU_max_px``): the class's maps min-max normalised,
  predicted ``norm > t`` for the 21 thresholds ``0, 0.05, ..., 1``; IoU = intersection / (union
  + 1e-8) over all pixels of the class; the maximum over the thresholds.
* ``AUPIMO`` (anomalib's ``aupimo_scores``, Bertoldo et al. 2024): thresholds ``linspace(min, max,
  K)`` of the normal images' maps (float32); shared FPR = mean over normal images of their own FPR
  (predicted ``map >= t``); per anomalous image, its TPR integrated over log(shared FPR) between the
  thresholds whose shared FPR is closest to 1e-4 and 1e-5, divided by ``log(1e-4 / 1e-5)``, clipped
  to [0, 1]. The mean over the anomalous images is ``AUPIMO``, their standard deviation (ddof 1)
  ``AUPIMO-std``. Where anomalib refuses (30 points or fewer in the range) it is computed anyway,
  as anomalib's ``force=True`` does. Image classes come from the masks, as there.
* ``SegF1`` (MVTec AD 2): the pixel F1 over all pixels of the class at one threshold (predicted
  ``map >= t``). With ``threshold="validation"`` it is MVTec AD 2's: the mean + 3 standard
  deviations of the pixels of the class's held-out validation images (``data.validation=held_out``,
  :meth:`evaluation.evaluator.ADEvaluator.validation_maps`); ``"normal_test"`` takes the same
  statistic over the normal test images instead (a stand-in where no validation split is scored),
  a number gives it directly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from evaluation.metrics_ader import ADER_F1_THRESHOLDS

__all__ = [
    "AUPIMO_FPR_BOUNDS",
    "AUPIMO_THRESHOLDS",
    "EXTRA_METRICS",
    "aupimo",
    "compute_extra_metrics",
    "miou_max",
    "seg_f1",
]

EXTRA_METRICS: tuple[str, ...] = ("P-mIoU-max", "AUPIMO", "SegF1")  # selectable names
AUPIMO_THRESHOLDS = 300_000  # anomalib's default num_thresholds
AUPIMO_FPR_BOUNDS = (1e-5, 1e-4)
SEGF1_THRESHOLDS = ("validation", "normal_test")
_EPS = 1e-8


def _chunks(maps: Any, masks: np.ndarray, chunk: int):
    for start in range(0, len(maps), chunk):
        yield start, np.asarray(maps[start : start + chunk]), np.asarray(masks[start : start + chunk], bool)


def miou_max(maps: Any, masks: np.ndarray, chunk: int = 32) -> float:
    """ADer's ``mIoU_max_px`` of one class: max over 21 normalised thresholds of the pooled IoU."""
    lo, hi = float(np.min(maps)), float(np.max(maps))
    if not hi > lo:
        return math.nan
    n = len(ADER_F1_THRESHOLDS) + 1
    pred_by_k, inter_by_k, n_gt = np.zeros(n), np.zeros(n), 0
    for _, x, gt in _chunks(maps, masks, chunk):
        k = np.searchsorted(ADER_F1_THRESHOLDS, (x.astype(np.float64) - lo) / (hi - lo), side="left")
        pred_by_k += np.bincount(k.ravel(), minlength=n)
        inter_by_k += np.bincount(k[gt], minlength=n)
        n_gt += int(gt.sum())
    if not n_gt:
        return math.nan
    inter = np.cumsum(inter_by_k[::-1])[::-1][1:]  # pixels with norm > t_j, j = 0..20
    pred = np.cumsum(pred_by_k[::-1])[::-1][1:]
    return float(np.max(inter / (pred + n_gt - inter + _EPS)))


def _at_or_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``sorted_values`` are ``>= t`` for each threshold."""
    return len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="left")


def aupimo(
    maps: Any,
    masks: np.ndarray,
    num_thresholds: int = AUPIMO_THRESHOLDS,
    fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS,
    chunk: int = 32,
) -> dict[str, float]:
    """``AUPIMO`` (mean over anomalous images) and ``AUPIMO-std`` of one class, as anomalib.

    Also ``per_image`` (the anomalous images' scores, in order) and ``points`` (how many thresholds
    fall in the integration range). nan without normal or without anomalous images.
    """
    nan = {"AUPIMO": math.nan, "AUPIMO-std": math.nan, "per_image": np.zeros(0), "points": 0}
    normal = ~masks.reshape(len(masks), -1).any(axis=1)
    if normal.all() or not normal.any():
        return nan
    lo, hi = math.inf, -math.inf
    for start, x, _ in _chunks(maps, masks, chunk):
        sel = x[normal[start : start + len(x)]]
        if sel.size:
            lo, hi = min(lo, float(sel.min())), max(hi, float(sel.max()))
    if not hi > lo:
        return nan
    thresholds = torch.linspace(lo, hi, num_thresholds, dtype=torch.float32).numpy()
    fpr_sum = np.zeros(num_thresholds)
    for start, x, _ in _chunks(maps, masks, chunk):
        for img in x[normal[start : start + len(x)]].astype(np.float32):
            flat = np.sort(img.ravel())
            fpr_sum += _at_or_above(flat, thresholds) / flat.size
    shared_fpr = fpr_sum / int(normal.sum())  # descending as the thresholds ascend
    low_fpr, high_fpr = fpr_bounds
    first = int(np.argmin(np.abs(shared_fpr - high_fpr)))  # lowest threshold of the range
    last = int(np.argmin(np.abs(shared_fpr - low_fpr)))
    if first >= last:
        return nan
    fpr = shared_fpr[first : last + 1][::-1]
    with np.errstate(divide="ignore"):
        log_fpr = np.log(fpr)
    keep = np.isfinite(log_fpr)
    if not keep.any():
        return nan
    band = thresholds[first : last + 1][::-1][keep]
    log_fpr = log_fpr[keep]
    norm = math.log(high_fpr / low_fpr)
    scores = []
    for _, x, gt in _chunks(maps, masks, chunk):
        for img, m in zip(x.astype(np.float32), gt, strict=True):
            if not m.any():
                continue
            pos = np.sort(img[m])
            tpr = _at_or_above(pos, band) / pos.size
            scores.append(min(max(float(np.trapezoid(tpr, log_fpr)) / norm, 0.0), 1.0))
    values = np.asarray(scores)
    return {
        "AUPIMO": float(values.mean()),
        "AUPIMO-std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        "per_image": values,
        "points": int(keep.sum()),
    }


def seg_f1(
    maps: Any,
    masks: np.ndarray,
    threshold: float | str = "normal_test",
    chunk: int = 32,
    validation: Any = None,
) -> float:
    """MVTec AD 2's SegF1 of one class: the pooled pixel F1 at one threshold (``map >= t``).

    ``threshold``: a number; ``"validation"``: the mean + 3 std of the pixels of ``validation``
    (the class's held-out validation maps [N, H, W], all normal); ``"normal_test"``: the same over
    the test images whose mask is empty. nan without anomalous pixels, or without the images the
    threshold comes from.
    """
    if isinstance(threshold, str):
        if threshold not in SEGF1_THRESHOLDS:
            raise ValueError(f"SegF1 threshold {threshold!r}: use a number or {', '.join(SEGF1_THRESHOLDS)}")
        if threshold == "validation":
            if validation is None or not len(validation):
                return math.nan
            normals = (np.asarray(validation[i : i + chunk]) for i in range(0, len(validation), chunk))
        else:
            normals = (x[~gt.reshape(len(gt), -1).any(axis=1)] for _, x, gt in _chunks(maps, masks, chunk))
        total = total_sq = 0.0
        count = 0
        for normal in normals:
            normal = normal.astype(np.float64)
            total += float(normal.sum())
            total_sq += float((normal**2).sum())
            count += normal.size
        if not count:
            return math.nan
        mean = total / count
        threshold = mean + 3.0 * math.sqrt(max(total_sq / count - mean**2, 0.0))
    tp = fp = fn = 0
    for _, x, gt in _chunks(maps, masks, chunk):
        pred = x >= threshold
        tp += int(np.count_nonzero(pred & gt))
        fp += int(np.count_nonzero(pred & ~gt))
        fn += int(np.count_nonzero(~pred & gt))
    if not tp + fn:
        return math.nan
    return 2.0 * tp / (2.0 * tp + fp + fn)


def compute_extra_metrics(
    maps: Any,
    masks: np.ndarray,
    metrics: tuple[str, ...],
    segf1_threshold: float | str = "normal_test",
    aupimo_thresholds: int = AUPIMO_THRESHOLDS,
    validation: Any = None,
) -> dict[str, float]:
    """The requested ones of :data:`EXTRA_METRICS` for one class (``AUPIMO`` brings ``AUPIMO-std``);
    ``validation``: the class's held-out validation maps, for ``segf1_threshold="validation"``."""
    out: dict[str, float] = {}
    if "P-mIoU-max" in metrics:
        out["P-mIoU-max"] = miou_max(maps, masks)
    if "AUPIMO" in metrics:
        result = aupimo(maps, masks, num_thresholds=aupimo_thresholds)
        out["AUPIMO"], out["AUPIMO-std"] = result["AUPIMO"], result["AUPIMO-std"]
    if "SegF1" in metrics:
        out["SegF1"] = seg_f1(maps, masks, segf1_threshold, validation=validation)
    return out
