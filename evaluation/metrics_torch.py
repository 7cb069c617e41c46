"""The exact metrics of :mod:`evaluation.metrics_exact`, computed with torch on the device of the maps.

Same algorithm and same tie handling as :func:`compute_metrics_exact`: the scores are split
into positives and negatives, the negatives are sorted once, every distinct positive score is located
in them with ``searchsorted``, and AUROC, AP, F1-max and AU-PRO are all read from those rank
statistics. Everything runs on the tensors' device (CPU or CUDA) except the connected components
of the masks for AU-PRO: they are labelled on the CPU with ``scipy.ndimage`` (the masks are small
and boolean) and only the per-pixel region weights move to the device. Rank counts are int64, and
sums of ratios and weights are float64 on the device.

Results equal ``compute_metrics`` on the same inputs up to floating-point summation order (parallel
sums and prefix sums in float64): AUROC is bit-identical (an integer statistic), the others agree
to about 1e-12 (the tests require 1e-9). float16 maps are widened to float32 after the split, as
the numpy path does, so the same values and ties are ranked. Undefined metrics are nan, as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evaluation.metrics_exact import (
    METRIC_NAMES,
    fpr_crossing_count,
    region_weights,
    squeeze_channel,
    wanted_metrics,
)

__all__ = ["compute_metrics_torch"]


@dataclass
class _TorchRanked:
    """Rank statistics of the distinct positive scores against the sorted negatives (on one device)."""

    n_pos: int
    n_neg: int
    neg_sorted: torch.Tensor  # ascending negative scores
    pos_values: torch.Tensor  # distinct positive scores, ascending
    pos_first: torch.Tensor  # int64: index of each distinct value's first occurrence among sorted positives
    pos_counts: torch.Tensor  # int64: multiplicity of each distinct positive score
    neg_lt: torch.Tensor  # int64: number of negatives < value
    neg_le: torch.Tensor  # int64: number of negatives <= value
    pos_weights: torch.Tensor | None  # float64: per-distinct-value sum of the AU-PRO weights


def _as_tensor(x: Any, device: torch.device) -> torch.Tensor:
    """A tensor on ``device``; numpy arrays (also read-only memory maps) are copied only when needed."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return x.detach().to(device)


def _scores(x: Any, device: torch.device) -> torch.Tensor:
    """Scores as float16/32/64 (others become float64), as ``evaluation.metrics`` keeps them; NaN raises."""
    t = _as_tensor(x, device)
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float64)
    if bool(torch.isnan(t).any()):
        raise ValueError("scores/anomaly maps contain NaN")
    return t


def _binary(x: Any, device: torch.device) -> torch.Tensor:
    """Labels/masks as bool; non-bool inputs are thresholded at 0.5 (0/1 and 0/255 both work)."""
    t = _as_tensor(x, device)
    return t if t.dtype == torch.bool else t > 0.5


def _rank(scores: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor | None = None) -> _TorchRanked:
    """Split flat scores by flat bool ``positive`` and rank the positives among the negatives.

    ``weights`` (float64, aligned with ``scores[positive]``) are summed per distinct positive score.
    """
    pos, neg = scores[positive], scores[~positive]
    if scores.dtype == torch.float16:  # exact widening; the numpy path sorts float32 too
        pos, neg = pos.float(), neg.float()
    neg = torch.sort(neg).values
    if weights is None:
        pos = torch.sort(pos).values
    else:
        pos, order = torch.sort(pos, stable=True)
        weights = weights[order]
        del order
    values, counts = torch.unique_consecutive(pos, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    pos_weights = None
    if weights is not None and pos.numel():
        group = torch.repeat_interleave(torch.arange(values.numel(), device=pos.device), counts)
        pos_weights = torch.zeros(values.numel(), dtype=torch.float64, device=pos.device)
        pos_weights.index_add_(0, group, weights)
    return _TorchRanked(
        n_pos=int(pos.numel()),
        n_neg=int(neg.numel()),
        neg_sorted=neg,
        pos_values=values,
        pos_first=first,
        pos_counts=counts,
        neg_lt=torch.searchsorted(neg, values, side="left"),
        neg_le=torch.searchsorted(neg, values, side="right"),
        pos_weights=pos_weights,
    )


def _roc_auc(r: _TorchRanked) -> float:
    if r.n_pos == 0 or r.n_neg == 0:
        return math.nan
    twice_u = int(torch.sum(r.pos_counts * (r.neg_lt + r.neg_le)))  # Mann-Whitney, ties count half
    return twice_u / (2 * r.n_pos * r.n_neg)


def _tp_fp(r: _TorchRanked) -> tuple[torch.Tensor, torch.Tensor]:
    """True/false positive counts (float64) when thresholding at each distinct positive score."""
    return (r.n_pos - r.pos_first).double(), (r.n_neg - r.neg_lt).double()


def _average_precision(r: _TorchRanked) -> float:
    if r.n_pos == 0:
        return math.nan
    tp, fp = _tp_fp(r)
    return float(torch.dot(r.pos_counts.double(), tp / (tp + fp))) / r.n_pos


def _f1_max(r: _TorchRanked) -> float:
    if r.n_pos == 0:
        return math.nan
    tp, fp = _tp_fp(r)
    return float(torch.max(2.0 * tp / (tp + fp + r.n_pos)))


def _au_pro(r: _TorchRanked, fpr_limit: float) -> float:
    """AU-PRO from the ranked scores; the same cut and interpolation as ``metrics_exact._au_pro``."""
    n_neg = r.n_neg
    if r.n_pos == 0 or n_neg == 0 or r.pos_weights is None:
        return math.nan
    c_cross = fpr_crossing_count(fpr_limit, n_neg)
    w = r.pos_weights
    if c_cross > n_neg:  # the limit is never exceeded: the whole curve
        j0, partial = 0, 0.0
    else:
        v_cross = r.neg_sorted[n_neg - c_cross : n_neg - c_cross + 1]
        j0 = int(torch.searchsorted(r.neg_sorted, v_cross, side="right"))  # negatives <= v_cross
        j1 = int(torch.searchsorted(r.neg_sorted, v_cross, side="left"))  # negatives < v_cross
        fpr_prev, fpr_next = (n_neg - j0) / n_neg, (n_neg - j1) / n_neg
        cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])
        total = float(cw[-1])
        pro_next = total - float(cw[int(torch.searchsorted(r.pos_values, v_cross, side="left"))])
        pro_prev = total - float(cw[int(torch.searchsorted(r.pos_values, v_cross, side="right"))])
        dx = fpr_limit - fpr_prev
        y_cross = pro_prev + (pro_next - pro_prev) * dx / (fpr_next - fpr_prev)
        partial = 0.5 * (pro_prev + y_cross) * dx
    above = (r.neg_le - j0).clamp_min(0) + (r.neg_lt - j0).clamp_min(0)
    full = float(torch.dot(w, above.double())) / (2.0 * n_neg)
    return (full + partial) / fpr_limit


def compute_metrics_torch(
    anomaly_maps: Any,
    masks: Any,
    labels: Any,
    metrics: Sequence[str] | None = None,
    scores: Any = None,
    device: torch.device | str | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """:func:`compute_metrics_exact` (same arguments, keys and nan rules) computed with torch.

    Runs on ``device``, by default the device of ``anomaly_maps`` (CPU for numpy input); masks
    (from the host, where AU-PRO labels their regions), labels and scores are moved there. The
    maps may stay float16 (widened after the split). Curve points are not produced here: use
    ``compute_metrics(..., curves=...)`` for plots.
    """
    wanted = wanted_metrics(metrics)
    if device is None:
        device = anomaly_maps.device if isinstance(anomaly_maps, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    maps = squeeze_channel(_scores(anomaly_maps, device), "anomaly_maps")
    # masks are labelled on the host (AU-PRO regions): built there, copied to the device once
    host_gts = squeeze_channel(_binary(masks, torch.device("cpu")), "masks")
    gts = host_gts.to(device)
    if maps.shape != gts.shape:
        raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {tuple(gts.shape)} differ in shape")
    results: dict[str, float] = {}

    if wanted & {"I-AUROC", "I-AP", "I-F1max"}:
        img_scores = maps.flatten(1).amax(1) if scores is None else _scores(scores, device).reshape(-1)
        img_labels = _binary(labels, device).reshape(-1)
        if img_scores.numel() != img_labels.numel():
            raise ValueError(
                f"scores and labels differ in size: {img_scores.numel()} vs {img_labels.numel()}"
            )
        if img_labels.numel() != len(maps):
            raise ValueError(f"expected {len(maps)} image labels/scores, got {img_labels.numel()}")
        img = _rank(img_scores, img_labels)
        results["I-AUROC"] = _roc_auc(img)
        results["I-AP"] = _average_precision(img)
        results["I-F1max"] = _f1_max(img)
        del img

    if wanted & {"P-AUROC", "P-AP", "P-F1max", "AUPRO"}:
        weights = None
        if "AUPRO" in wanted:  # connected components on the CPU; only the weights go to the device
            weights = torch.from_numpy(region_weights(host_gts.numpy())).to(device)
        pix = _rank(maps.reshape(-1), gts.reshape(-1), weights)
        del weights
        results["P-AUROC"] = _roc_auc(pix)
        results["P-AP"] = _average_precision(pix)
        results["P-F1max"] = _f1_max(pix)
        if "AUPRO" in wanted:
            results["AUPRO"] = _au_pro(pix, fpr_limit)

    return {name: results[name] for name in METRIC_NAMES if name in wanted}
