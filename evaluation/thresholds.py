"""Operating points: the image and pixel thresholds that maximise F1, per class and overall.

An evaluation (or ``tools/calibrate.py`` on a separate labelled folder) ends with
``thresholds.json`` in the run folder; ``tools/predict.py``, ``mambaad.predict`` and the export's
``model.json`` turn scores and maps into a label (``score >= image``) and a mask
(``map >= pixel``) with it. Image thresholds are exact (every distinct score is a candidate).
Pixel thresholds are exact over the float16 values of the maps (the evaluator stores maps in
float16): a 65,536-bin count of the float16 bit patterns per class, summed over classes for the
overall value, so memory stays bounded however many pixels there are.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS_FILE = "thresholds.json"
OVERALL = "overall"
_KEYS = 1 << 16
TEST_SPLIT_NOTE = (
    "calibrated on the test split it was evaluated on: choosing the F1-maximising threshold there is a "
    "selection on the test set (optimistic); calibrate on separate labelled images with tools/calibrate.py"
)


def image_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(threshold, F1)`` maximising F1 of ``score >= threshold`` against ``labels``; nan without positives.

    F1 = 2 tp / (tp + fp + P) is largest, for a given tp, at the highest threshold reaching it, so the
    candidates are the distinct scores of anomalous images.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan, math.nan
    candidates = np.unique(s[y])
    ordered = np.sort(s)
    above = len(s) - np.searchsorted(ordered, candidates, side="left")  # predicted anomalous
    pos_sorted = np.sort(s[y])
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    f1 = 2.0 * tp / (above + n_pos)
    best = int(np.argmax(f1[::-1]))  # ties: the highest threshold
    best = len(f1) - 1 - best
    return float(candidates[best]), float(f1[best])


def _keys(values: np.ndarray) -> np.ndarray:
    """float16 bit patterns as uint16 keys whose order is the values' order."""
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    return np.where(bits & 0x8000, 0xFFFF - bits, bits | 0x8000).astype(np.uint16)


def _value(key: int) -> float:
    bits = (0xFFFF - key) if key < 0x8000 else key & 0x7FFF
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def pixel_counts(maps: np.ndarray, masks: np.ndarray, chunk: int = 64) -> np.ndarray:
    """``[2, 65536]`` counts of normal (row 0) and anomalous (row 1) pixels per float16 value key."""
    counts = np.zeros((2, _KEYS), np.int64)
    for start in range(0, len(maps), chunk):
        keys = _keys(np.asarray(maps[start : start + chunk])).reshape(-1)
        pos = np.asarray(masks[start : start + chunk]).reshape(-1).astype(bool)
        counts[1] += np.bincount(keys[pos], minlength=_KEYS)
        counts[0] += np.bincount(keys[~pos], minlength=_KEYS)
    return counts


def pixel_threshold(counts: np.ndarray) -> tuple[float, float]:
    """``(threshold, F1)`` maximising pixel F1 of ``map >= threshold`` from :func:`pixel_counts`."""
    n_pos = int(counts[1].sum())
    if n_pos == 0:
        return math.nan, math.nan
    tp = np.cumsum(counts[1][::-1])[::-1]  # pixels >= each key
    above = np.cumsum(counts.sum(0)[::-1])[::-1]
    f1 = 2.0 * tp / (above + n_pos)
    f1[counts[1] == 0] = -1.0  # the maximum is at a value some anomalous pixel has
    best = int(np.argmax(f1))
    return _value(best), float(f1[best])


def f1_curve(counts: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Pixel F1 against the threshold over the range of the values present (for plots)."""
    present = np.flatnonzero(counts.sum(0))
    n_pos = int(counts[1].sum())
    if not len(present) or n_pos == 0:
        return np.zeros(0), np.zeros(0)
    tp_all = np.cumsum(counts[1][::-1])[::-1]
    above_all = np.cumsum(counts.sum(0)[::-1])[::-1]
    f1_all = 2.0 * tp_all / (above_all + n_pos)
    f1_all[counts[1] == 0] = -1.0
    best = int(np.argmax(f1_all))  # the chosen threshold is one of the points
    keys = np.unique(np.r_[np.linspace(present[0], present[-1], points).astype(np.int64), best])
    return np.array([_value(int(k)) for k in keys]), 2.0 * tp_all[keys] / (above_all[keys] + n_pos)


def value_range(counts: np.ndarray) -> tuple[float, float]:
    """Smallest and largest map value counted."""
    present = np.flatnonzero(counts.sum(0))
    if not len(present):
        return math.nan, math.nan
    return _value(int(present[0])), _value(int(present[-1]))


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def calibrate(
    classes: Iterable[tuple[str, np.ndarray, np.ndarray, Any, Any]], split: str, source: str, note: str
) -> dict[str, Any]:
    """The content of ``thresholds.json`` for ``(class, scores, labels, maps, masks)`` items.

    ``maps`` / ``masks`` (``[N, H, W]``, arrays or memory maps) may be callables returning them, so a
    caller can hand over one class at a time. Classes without anomalous images (or pixels) get null
    and fall back to the overall values when used.
    """
    all_scores, all_labels, total = [], [], np.zeros((2, _KEYS), np.int64)
    per_class: dict[str, Any] = {}
    for cls, scores, labels, maps, masks in classes:
        maps = maps() if callable(maps) else maps
        masks = masks() if callable(masks) else masks
        counts = pixel_counts(maps, masks)
        total += counts
        s, y = np.asarray(scores, np.float64).reshape(-1), np.asarray(labels).reshape(-1) > 0
        all_scores.append(s)
        all_labels.append(y)
        img_t, img_f1 = image_threshold(s, y)
        pix_t, pix_f1 = pixel_threshold(counts)
        per_class[cls] = {
            "image": _num(img_t),
            "image_f1": _num(img_f1),
            "pixel": _num(pix_t),
            "pixel_f1": _num(pix_f1),
            "images": len(s),
            "anomalous_images": int(y.sum()),
            "pixel_f1_curve": [[_num(a), _num(b)] for a, b in zip(*f1_curve(counts, 60), strict=True)],
        }
    if not per_class:
        raise ValueError("thresholds need at least one class of scored images")
    img_t, img_f1 = image_threshold(np.concatenate(all_scores), np.concatenate(all_labels))
    pix_t, pix_f1 = pixel_threshold(total)
    lo, hi = value_range(total)
    return {
        "source": source,
        "split": split,
        "note": note,
        "rule": "anomalous image: score >= image; anomalous pixel: map >= pixel (map at the model's size)",
        "pixel_values": "F1 over the float16 values of the maps (exact for the evaluator's float16 maps)",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        OVERALL: {
            "image": _num(img_t),
            "image_f1": _num(img_f1),
            "pixel": _num(pix_t),
            "pixel_f1": _num(pix_f1),
            "images": int(sum(len(s) for s in all_scores)),
            "anomalous_images": int(sum(y.sum() for y in all_labels)),
        },
        "map_range": [_num(lo), _num(hi)],
        "classes": per_class,
    }


def save(thresholds: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``thresholds`` as strict JSON, replacing ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(thresholds, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def evaluation_target(run_dir: str | Path) -> Path:
    """Where an evaluation writes its thresholds: ``thresholds.json``, unless that file came from
    ``tools/calibrate.py`` (a deliberate choice an evaluation must not replace), then
    ``thresholds_test.json`` beside it."""
    path = Path(run_dir) / THRESHOLDS_FILE
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("source") == "calibrate":
                return path.with_name("thresholds_test.json")
        except (OSError, ValueError, AttributeError):
            pass
    return path
