"""Qualitative results: image / ground truth / heat map / thresholded prediction of chosen cases."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evaluation.plots import pyplot


def pick_cases(scores: np.ndarray, labels: np.ndarray, n: int = 3) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` worst and ``n`` best cases by image score.

    Each image gets its score's rank fraction r in [0, 1] within the class; the error is ``1 - r``
    for anomalous and ``r`` for normal images. Worst = largest error (missed defects, false alarms),
    best = smallest (confident, correct); the two lists do not overlap.
    """
    order = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    rank = order / max(len(scores) - 1, 1)
    error = np.where(np.asarray(labels) > 0, 1.0 - rank, rank)
    by_error = np.argsort(-error, kind="stable")
    n = min(n, len(scores) // 2) if len(scores) > 1 else len(scores)
    worst = [int(i) for i in by_error[:n]]
    best = [int(i) for i in by_error[::-1][:n] if int(i) not in worst]
    return worst, best


def save_case_grid(
    cls: str,
    maps: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    image_of: Callable[[int], np.ndarray],
    threshold: float,
    path: str | Path,
    n: int = 3,
) -> Path:
    """One PNG, a row per case (worst first, then best): image, ground truth, heat map, prediction.

    maps: [N, H, W] of the class; the heat map is scaled to the class's min-max so rows compare;
    the prediction is ``map >= threshold`` (the pixel F1-max threshold; none if it is nan).
    ``image_of(i)``: case ``i``'s image as RGB uint8 [H, W, 3] at the map size (the caller reads it).
    """
    plt = pyplot()
    worst, best = pick_cases(np.asarray(scores), np.asarray(labels), n)
    rows = [("worst", i) for i in worst] + [("best", i) for i in best]
    lo, hi = float(np.min(maps)), float(np.max(maps))
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), dpi=100, squeeze=False)
    for r, (kind, i) in enumerate(rows):
        image = image_of(i)
        amap = np.asarray(maps[i], dtype=np.float32)
        pred = amap >= threshold if not math.isnan(threshold) else np.zeros_like(amap, dtype=bool)
        panels = [
            (image, None, f"{kind}: {'anomalous' if labels[i] else 'normal'}"),
            (masks[i], "gray", "ground truth"),
            (amap, "jet", f"score {float(scores[i]):.3f}"),
            (pred, "gray", "prediction"),
        ]
        for c, (data, cmap, title) in enumerate(panels):
            ax = axes[r, c]
            if c == 2:
                ax.imshow(image)
                ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, alpha=0.5)
            else:
                ax.imshow(data, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{cls} (threshold {threshold:.4g})", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
