"""The metrics of an evaluation, in the mode the config asks for.

One entry point, :func:`compute_metrics`, over the modes' own modules: ``exact`` (every
threshold, :mod:`evaluation.metrics_exact`, or on a torch device :mod:`evaluation.metrics_torch`),
``ader`` (the ADer benchmark's ADEval pixel metrics, :mod:`evaluation.metrics_ader`) and
``mambaad`` (the MambaAD paper's evaluator, :mod:`evaluation.metrics_mambaad`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evaluation.metrics_ader import compute_metrics_ader
from evaluation.metrics_exact import compute_metrics_exact
from evaluation.metrics_mambaad import MAMBAAD_AUPRO_STEPS, compute_metrics_mambaad
from evaluation.metrics_torch import compute_metrics_torch

__all__ = ["METRIC_MODES", "compute_metrics"]

# exact: every threshold; ader: the ADer benchmark's ADEval histograms; mambaad: the MambaAD paper's evaluator
METRIC_MODES: tuple[str, ...] = ("exact", "ader", "mambaad")


def compute_metrics(
    anomaly_maps: Any,
    masks: Any,
    labels: Any,
    metrics: Sequence[str] | None = None,
    scores: Any = None,
    curves: dict[str, Any] | None = None,
    mode: str = "exact",
    device: Any = None,
    aupro_limit: float = 0.3,
    aupro_steps: int | None = None,
) -> dict[str, float]:
    """The requested metrics (default: all of ``METRIC_NAMES``) as fractions in [0, 1].

    Arguments and result as :func:`evaluation.metrics_exact.compute_metrics_exact`, plus
    ``mode``: ``exact``, ``ader`` or ``mambaad`` (the latter takes the image labels from the
    masks), ``device``: None computes with numpy; a torch device (e.g. ``cuda``) computes
    ``exact`` with torch there (same numbers; no curve points), ``aupro_limit``: the FPR where the
    AU-PRO area ends, and ``aupro_steps``: the thresholds of ``mambaad``'s AU-PRO sweep (None: its
    100; the other modes take every threshold or ADEval's bins and accept only None).
    """
    if mode not in METRIC_MODES:
        raise ValueError(f"unknown metrics mode {mode!r}; use one of {', '.join(METRIC_MODES)}")
    if aupro_steps is not None and mode != "mambaad":
        raise ValueError(f"aupro_steps={aupro_steps} applies to mode mambaad only, not {mode}")
    options = {"metrics": metrics, "scores": scores, "fpr_limit": aupro_limit}
    if mode == "ader":
        return compute_metrics_ader(anomaly_maps, masks, labels, curves=curves, **options)
    if mode == "mambaad":
        steps = MAMBAAD_AUPRO_STEPS if aupro_steps is None else aupro_steps
        return compute_metrics_mambaad(
            anomaly_maps, masks, labels, curves=curves, aupro_steps=steps, **options
        )
    if device is not None and curves is None:
        return compute_metrics_torch(anomaly_maps, masks, labels, device=device, **options)
    return compute_metrics_exact(anomaly_maps, masks, labels, curves=curves, **options)
