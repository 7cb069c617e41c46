"""Exact anomaly-detection metrics (image/pixel AUROC, AP, F1-max and AU-PRO), the metric names
and the averages over classes. :mod:`evaluation.metrics` dispatches to them and the other modes.

All metrics are computed exactly over every distinct threshold (no binning), with ties handled as
scikit-learn (``roc_auc_score``, ``average_precision_score``, ``precision_recall_curve``) and the
MVTec AD evaluation script (AU-PRO) handle them.

Implementation: instead of one argsort over all (~10^8) pixels, the scores are split into positives
and negatives. The negatives are sorted in place (a fast SIMD sort, no index array) and every
distinct positive score is located in them with ``searchsorted``. Every curve quantity the metrics
need changes only at such locations:

* AUROC is the Mann-Whitney statistic ``sum_pos (#neg < s + #neg <= s) / 2 / (P * N)``, which
  equals the trapezoidal ROC area with tied scores.
* AP and F1-max only change where the true-positive count changes, i.e. at distinct positive
  scores, where ``tp = #pos >= s`` and ``fp = #neg >= s``.
* AU-PRO: each anomalous pixel carries the weight ``1 / (R * |region|)`` so that PRO(t) is the
  weighted count of anomalous pixels scoring ``>= t``. The trapezoid between two consecutive curve
  points has width (negatives at the lower threshold) / N, so the area up to the FPR limit becomes a
  weighted pair count between anomalous pixels and the negatives above the crossing threshold, plus
  one interpolated partial trapezoid at the limit.

Only the positives (usually a few percent of the pixels) are argsorted, which keeps memory at
roughly one extra copy of the score maps and the run time dominated by a single ``np.sort``.

Undefined metrics are returned as ``nan`` instead of raising: AUROC and AU-PRO need both classes
(AU-PRO needs anomalous *and* normal pixels); AP and F1-max need at least one positive (with no
negatives they are 1.0, as in scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "EXTRA_METRIC_COLUMNS",
    "METRIC_NAMES",
    "SAMPLE_METRIC_NAMES",
    "add_mad",
    "au_pro",
    "average_over_classes",
    "average_precision",
    "compute_metrics_exact",
    "f1_max",
    "inverse_region_sizes",
    "metric_columns",
    "roc_auc",
    "with_mad",
]

METRIC_NAMES: tuple[str, ...] = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
# Multi-view data (Real-IAD): one score per sample = max over its views; reported, not part of mAD.
SAMPLE_METRIC_NAMES: tuple[str, ...] = ("S-AUROC", "S-AP", "S-F1max")
# metrics of other frameworks (evaluation/metrics_extra.py), shown after mAD and not part of it
EXTRA_METRIC_COLUMNS: tuple[str, ...] = ("P-mIoU-max", "AUPIMO", "AUPIMO-std", "SegF1")

_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a numpy array, torch tensor or array-like to a numpy array without copying if possible."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_scores(x: Any) -> np.ndarray:
    """Scores as float16/32/64 (kept if already one of those, so tie structure is preserved).

    float16 stays float16 here (the evaluator stores maps that way) and is widened to float32 only
    after the positive/negative split, so a class never needs a full float32 copy of its maps.
    """
    arr = _to_numpy(x)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError("scores/anomaly maps contain NaN")
    return arr


def as_bool(x: Any) -> np.ndarray:
    """Binary labels/masks as bool; non-bool inputs are thresholded at 0.5 (works for 0/1 and 0/255)."""
    arr = _to_numpy(x)
    return arr if arr.dtype == bool else arr > 0.5


def squeeze_channel(arr: np.ndarray, name: str) -> np.ndarray:
    """Accept [N, H, W] or [N, 1, H, W]."""
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape [N, H, W], got {arr.shape}")
    return arr


@dataclass
class _Ranked:
    """Rank statistics of the distinct positive scores against the sorted negatives."""

    n_pos: int
    n_neg: int
    neg_sorted: np.ndarray  # ascending negative scores
    pos_values: np.ndarray  # distinct positive scores, ascending
    pos_first: np.ndarray  # index of each distinct value's first occurrence among the sorted positives
    pos_counts: np.ndarray  # multiplicity of each distinct positive score
    neg_lt: np.ndarray  # number of negatives < value
    neg_le: np.ndarray  # number of negatives <= value
    pos_weights: np.ndarray | None  # per-distinct-value sum of the AU-PRO weights (if requested)


def _split(scores: np.ndarray, positive: np.ndarray, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative scores as new arrays, filled chunk by chunk.

    float16 becomes float32 (numpy sorts float16 slowly; the widening is exact). Working in chunks
    avoids full-size temporaries (a ``~positive`` mask, float16 copies), which matters for
    Real-IAD-sized classes (~250 M pixels).
    """
    dtype = np.float32 if scores.dtype == np.float16 else scores.dtype
    n_pos = int(np.count_nonzero(positive))
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(scores.size - n_pos, dtype=dtype)
    i_pos = i_neg = 0
    for start in range(0, scores.size, chunk):
        part, is_pos = scores[start : start + chunk], positive[start : start + chunk]
        values = part[is_pos]
        pos[i_pos : i_pos + values.size] = values
        i_pos += values.size
        values = part[~is_pos]
        neg[i_neg : i_neg + values.size] = values
        i_neg += values.size
    return pos, neg


def _rank(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> _Ranked:
    """Split flat scores by the flat bool ``positive`` and rank the positives among the negatives.

    ``weights`` (aligned with ``scores[positive]``) are summed per distinct positive score.
    """
    pos, neg = _split(scores, positive)
    neg.sort()
    if weights is None:
        pos.sort()
    else:
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        weights = weights[order]
        del order
    first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])[: pos.size]  # start of each run of equal scores
    values = pos[first]
    counts = np.diff(np.r_[first, pos.size])
    pos_weights = np.add.reduceat(weights, first) if weights is not None and pos.size else None
    return _Ranked(
        n_pos=int(pos.size),
        n_neg=int(neg.size),
        neg_sorted=neg,
        pos_values=values,
        pos_first=first,
        pos_counts=counts,
        neg_lt=np.searchsorted(neg, values, side="left"),
        neg_le=np.searchsorted(neg, values, side="right"),
        pos_weights=pos_weights,
    )


def _rank_flat(scores: Any, labels: Any) -> _Ranked:
    s = _as_scores(scores).reshape(-1)
    y = as_bool(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    return _rank(s, y)


def _roc_auc(r: _Ranked) -> float:
    if r.n_pos == 0 or r.n_neg == 0:
        return math.nan
    # Each positive beats the negatives below it and ties count half: the trapezoidal ROC area.
    twice_u = int(np.dot(r.pos_counts, r.neg_lt + r.neg_le))
    return twice_u / (2 * r.n_pos * r.n_neg)


def _tp_fp(r: _Ranked) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts when thresholding at each distinct positive score (``>=``)."""
    tp = (r.n_pos - r.pos_first).astype(np.float64)
    fp = (r.n_neg - r.neg_lt).astype(np.float64)
    return tp, fp


def _average_precision(r: _Ranked) -> float:
    if r.n_pos == 0:
        return math.nan
    tp, fp = _tp_fp(r)
    # Recall increases by count/P exactly at the distinct positive scores.
    return float(np.dot(r.pos_counts, tp / (tp + fp)) / r.n_pos)


def _f1_max(r: _Ranked) -> float:
    return _f1_max_and_threshold(r)[0]


def _f1_max_and_threshold(r: _Ranked) -> tuple[float, float]:
    """Maximum F1 and the score threshold (predict ``>=``) that attains it; nan without positives."""
    if r.n_pos == 0:
        return math.nan, math.nan
    tp, fp = _tp_fp(r)
    # F1 = 2PR/(P+R) = 2tp/(tp+fp+P); for fixed tp it is largest at the highest threshold, which is a
    # distinct positive score, so the maximum over all thresholds is attained among those.
    f1 = 2.0 * tp / (tp + fp + r.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(r.pos_values[best])


def _thin(*arrays: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, ...]:
    """Every k-th point (first and last kept) so plotted curves stay small."""
    n = len(arrays[0])
    if n <= max_points:
        return arrays
    keep = np.unique(np.r_[np.linspace(0, n - 1, max_points).astype(np.int64), n - 1])
    return tuple(a[keep] for a in arrays)


def _curves(r: _Ranked, prefix: str) -> dict[str, np.ndarray]:
    """ROC and PR curve points (and the PRO curve when weights are known) from the ranked scores.

    Each distinct positive score v, from the highest down, contributes the points for ``> v`` and
    ``>= v``; between them only ties with v change the counts, so joining them is the exact curve.
    """
    if r.n_pos == 0 or r.n_neg == 0:
        return {}
    hi = slice(None, None, -1)
    tp_ge = (r.n_pos - r.pos_first)[hi].astype(np.float64)
    tp_gt = tp_ge - r.pos_counts[hi]
    fp_ge = (r.n_neg - r.neg_lt)[hi].astype(np.float64)
    fp_gt = (r.n_neg - r.neg_le)[hi].astype(np.float64)
    fpr = np.r_[0.0, np.column_stack([fp_gt, fp_ge]).ravel() / r.n_neg, 1.0]
    tpr = np.r_[0.0, np.column_stack([tp_gt, tp_ge]).ravel() / r.n_pos, 1.0]
    out: dict[str, np.ndarray] = {}
    out[f"{prefix}_roc_fpr"], out[f"{prefix}_roc_tpr"] = _thin(fpr, tpr)
    recall, precision = _thin(tp_ge / r.n_pos, tp_ge / (tp_ge + fp_ge))
    out[f"{prefix}_pr_recall"], out[f"{prefix}_pr_precision"] = recall, precision
    if r.pos_weights is not None:
        cw = np.r_[0.0, np.cumsum(r.pos_weights)]
        pro_ge = (cw[-1] - cw[:-1])[hi]
        pro_gt = (cw[-1] - cw[1:])[hi]
        pro = np.r_[0.0, np.column_stack([pro_gt, pro_ge]).ravel(), 1.0]
        out["pro_fpr"], out["pro_pro"] = _thin(fpr, pro)
    return out


def fpr_crossing_count(fpr_limit: float, n_neg: int) -> int:
    """Smallest false-positive count whose FPR exceeds ``fpr_limit`` (``n_neg + 1`` if none does).

    The threshold reaching it is the crossing point where the PRO curve is cut and interpolated.
    """
    c_cross = math.floor(fpr_limit * n_neg) + 1
    while c_cross > 1 and (c_cross - 1) / n_neg > fpr_limit:
        c_cross -= 1
    while c_cross <= n_neg and c_cross / n_neg <= fpr_limit:
        c_cross += 1
    return c_cross


def _au_pro(r: _Ranked, fpr_limit: float) -> float:
    n_neg = r.n_neg
    if r.n_pos == 0 or n_neg == 0 or r.pos_weights is None:
        return math.nan
    c_cross = fpr_crossing_count(fpr_limit, n_neg)
    w = r.pos_weights
    if c_cross > n_neg:
        # The limit is never exceeded: integrate the whole curve.
        j0 = 0
        partial = 0.0
    else:
        v_cross = r.neg_sorted[n_neg - c_cross]
        j0 = int(np.searchsorted(r.neg_sorted, v_cross, side="right"))  # negatives <= v_cross
        j1 = int(np.searchsorted(r.neg_sorted, v_cross, side="left"))  # negatives < v_cross
        fpr_prev = (n_neg - j0) / n_neg
        fpr_next = (n_neg - j1) / n_neg
        cw = np.r_[0.0, np.cumsum(w)]
        total = cw[-1]
        pro_next = total - cw[np.searchsorted(r.pos_values, v_cross, side="left")]
        pro_prev = total - cw[np.searchsorted(r.pos_values, v_cross, side="right")]
        dx = fpr_limit - fpr_prev
        y_cross = pro_prev + (pro_next - pro_prev) * dx / (fpr_next - fpr_prev)
        partial = 0.5 * (pro_prev + y_cross) * dx
    # Full trapezoids: each negative above the crossing threshold adds width 1/N and height
    # (PRO(>= v) + PRO(> v)) / 2, i.e. a weighted pair count with the anomalous pixels.
    above_le = np.maximum(r.neg_le - j0, 0)
    above_lt = np.maximum(r.neg_lt - j0, 0)
    full = float(np.dot(w, (above_le + above_lt).astype(np.float64))) / (2.0 * n_neg)
    return float((full + partial) / fpr_limit)


def inverse_region_sizes(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """``1 / |region|`` of each anomalous pixel, in ``masks[masks]`` order, and the region count R.

    Regions are the 8-connected components of each image's mask ([N, H, W] bool).
    """
    parts = []
    n_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=_CONNECTIVITY)
        sizes = np.bincount(lab.ravel())
        parts.append(1.0 / sizes[lab[mask]])
        n_regions += n
    if not parts:
        return np.zeros(0, dtype=np.float64), 0
    return np.concatenate(parts), n_regions


def region_weights(masks: np.ndarray) -> np.ndarray:
    """AU-PRO weight ``1 / (R * |region|)`` of each anomalous pixel, in ``masks[masks]`` order."""
    weights, n_regions = inverse_region_sizes(masks)
    if n_regions:
        weights /= n_regions
    return weights


def _prepare_maps(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps = squeeze_channel(_as_scores(anomaly_maps), "anomaly_maps")
    gts = squeeze_channel(as_bool(masks), "masks")
    if maps.shape != gts.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and masks {gts.shape} differ in shape")
    return maps, gts


def _rank_pixels(maps: np.ndarray, gts: np.ndarray, with_pro: bool) -> _Ranked:
    weights = region_weights(gts) if with_pro else None
    return _rank(maps.reshape(-1), gts.reshape(-1), weights)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve as ``sklearn.metrics.roc_auc_score``; nan if one class is absent."""
    return _roc_auc(_rank_flat(scores, labels))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision as in ``sklearn.metrics.average_precision_score``; nan without positives."""
    return _average_precision(_rank_flat(scores, labels))


def f1_max(scores: Any, labels: Any) -> float:
    """Maximum F1 over all distinct thresholds (``precision_recall_curve``); nan without positives."""
    return _f1_max(_rank_flat(scores, labels))


def au_pro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition).

    Regions are 8-connected components of each mask; one global threshold sweep over all images;
    the curve starts at (0, 0), is cut at ``fpr_limit`` by linear interpolation and the trapezoidal
    area is divided by ``fpr_limit``. Returns nan without anomalous or without normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps, gts = _prepare_maps(anomaly_maps, masks)
    return _au_pro(_rank_pixels(maps, gts, with_pro=True), fpr_limit)


def wanted_metrics(metrics: Sequence[str] | str | None) -> set[str]:
    """The requested metric names (all of ``METRIC_NAMES`` for None); unknown names raise."""
    if metrics is None:
        return set(METRIC_NAMES)
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid names: {', '.join(METRIC_NAMES)}")
    return set(metrics)


def compute_metrics_exact(
    anomaly_maps: Any,
    masks: Any,
    labels: Any,
    metrics: Sequence[str] | None = None,
    scores: Any = None,
    curves: dict[str, Any] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Compute the requested metrics (default: all of ``METRIC_NAMES``) as fractions in [0, 1].

    anomaly_maps: [N, H, W] float scores; masks: [N, H, W] bool/0-1 ground truth; labels: [N] image
    labels (1 = anomalous); scores: optional [N] image scores, default the maximum of each map.
    Image metrics (``I-*``) rank ``scores`` against ``labels``; pixel metrics (``P-*``, ``AUPRO``) use
    every pixel of all maps. Keys follow the order of ``METRIC_NAMES``; undefined metrics are nan.
    ``curves``: if a dict is given, it receives the curve points for plots (``image_roc_fpr``,
    ``pixel_pr_recall``, ``pro_fpr``, ...) and ``pixel_threshold``, the map value of the pixel F1-max,
    all from the same ranking as the metrics. ``fpr_limit``: where the AU-PRO area ends.
    """
    wanted = wanted_metrics(metrics)
    maps, gts = _prepare_maps(anomaly_maps, masks)
    results: dict[str, float] = {}

    if wanted & {"I-AUROC", "I-AP", "I-F1max"}:
        img_scores = maps.reshape(len(maps), -1).max(axis=1) if scores is None else scores
        img = _rank_flat(img_scores, labels)
        if img.n_pos + img.n_neg != len(maps):
            raise ValueError(f"expected {len(maps)} image labels/scores, got {img.n_pos + img.n_neg}")
        results["I-AUROC"] = _roc_auc(img)
        results["I-AP"] = _average_precision(img)
        results["I-F1max"] = _f1_max(img)
        if curves is not None:
            curves.update(_curves(img, "image"))
        del img

    if wanted & {"P-AUROC", "P-AP", "P-F1max", "AUPRO"}:
        pix = _rank_pixels(maps, gts, with_pro="AUPRO" in wanted)
        results["P-AUROC"] = _roc_auc(pix)
        results["P-AP"] = _average_precision(pix)
        results["P-F1max"], threshold = _f1_max_and_threshold(pix)
        if "AUPRO" in wanted:
            results["AUPRO"] = _au_pro(pix, fpr_limit)
        if curves is not None:
            curves.update(_curves(pix, "pixel"))
            curves["pixel_threshold"] = threshold

    return {name: results[name] for name in METRIC_NAMES if name in wanted}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def metric_columns(per_class: Mapping[str, Mapping[str, float]]) -> list[str]:
    present = {k for row in per_class.values() for k in row}
    return [m for m in (*METRIC_NAMES, *SAMPLE_METRIC_NAMES, *EXTRA_METRIC_COLUMNS) if m in present]


def with_mad(row: Mapping[str, float], columns: Sequence[str]) -> dict[str, float]:
    """The row's values for ``columns``, with ``mAD`` (mean of the standard seven) after those seven.

    mAD is nan when one of them is: a mean over fewer metrics would not compare with other rows.
    """
    out = {c: float(row.get(c, math.nan)) for c in columns if c in METRIC_NAMES}
    values = list(out.values())
    out["mAD"] = sum(values) / len(values) if values and not any(map(math.isnan, values)) else math.nan
    out.update({c: float(row.get(c, math.nan)) for c in columns if c not in METRIC_NAMES})
    return out


def add_mad(row: Mapping[str, float]) -> dict[str, float]:
    """``row``'s metrics in canonical order plus ``mAD``, the mean of its ``METRIC_NAMES`` entries.

    ``mAD`` is nan if one of those is nan. Sample-level metrics (``S-*``), when present, follow
    ``mAD`` and are not part of it.
    """
    return with_mad(
        row, [m for m in (*METRIC_NAMES, *SAMPLE_METRIC_NAMES, *EXTRA_METRIC_COLUMNS) if m in row]
    )


def average_over_classes(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the classes where it is defined, plus ``mAD``, the mean of the seven means.

    A metric undefined (nan) for some classes is averaged over the others; ``format_table`` says
    which. It is nan only where no class defines it.
    """
    if not per_class:
        raise ValueError("per_class is empty")
    columns = metric_columns(per_class)
    mean = {c: _nanmean([float(row.get(c, math.nan)) for row in per_class.values()]) for c in columns}
    return with_mad(mean, columns)
