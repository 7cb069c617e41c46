"""Accumulates anomaly maps per class and computes the seven metrics of spec section 4."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from util.metrics import METRIC_NAMES, add_mad, average_over_classes, compute_metrics


class ADEvaluator:
    """Per-class metrics (fractions in [0, 1]) plus their mean over classes.

    Maps are kept per class as float32 and masks as bool, so each class is scored on
    exactly its own images; the mean row averages classes, not images.
    """

    def __init__(self, metrics: Sequence[str] | None = None) -> None:
        self.metrics = tuple(metrics or METRIC_NAMES)
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated sample."""
        self._maps: dict[str, list[np.ndarray]] = defaultdict(list)
        self._masks: dict[str, list[np.ndarray]] = defaultdict(list)
        self._labels: dict[str, list[np.ndarray]] = defaultdict(list)
        self._scores: dict[str, list[np.ndarray]] = defaultdict(list)
        self.num_samples = 0

    def update(
        self,
        maps: torch.Tensor,
        scores: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        cls_names: Sequence[str],
    ) -> None:
        """Add a batch: maps [B,H,W], scores [B], masks [B,(1,)H,W], labels [B], class names."""
        maps_np = maps.detach().float().cpu().numpy()
        masks_np = masks.detach().cpu().numpy().reshape(maps_np.shape) > 0.5
        labels_np = labels.detach().cpu().numpy().astype(np.int64)
        scores_np = scores.detach().float().cpu().numpy()
        for cls in sorted(set(cls_names)):
            sel = np.array([c == cls for c in cls_names])
            self._maps[cls].append(maps_np[sel])
            self._masks[cls].append(masks_np[sel])
            self._labels[cls].append(labels_np[sel])
            self._scores[cls].append(scores_np[sel])
        self.num_samples += len(cls_names)

    def compute(self) -> dict[str, dict[str, float]]:
        """``{class: {metric: value, ..., "mAD": value}}`` per class seen, plus a ``"mean"`` entry."""
        per_class: dict[str, dict[str, float]] = {}
        for cls in sorted(self._maps):
            per_class[cls] = add_mad(
                compute_metrics(
                    np.concatenate(self._maps[cls]),
                    np.concatenate(self._masks[cls]),
                    np.concatenate(self._labels[cls]),
                    metrics=self.metrics,
                    scores=np.concatenate(self._scores[cls]),
                )
            )
        if not per_class:
            raise RuntimeError("the evaluator received no test samples")
        return {**per_class, "mean": average_over_classes(per_class)}
