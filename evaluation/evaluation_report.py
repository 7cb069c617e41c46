"""What every evaluation leaves for a person to act on: ``thresholds.json`` and ``report.html``.

Called once, at the end of :meth:`evaluation.evaluator.ADEvaluator.compute`, with the per-class
stores the metrics were computed from. The thresholds are the F1-maximising ones of the evaluated
(test) split, labelled as such (:mod:`evaluation.thresholds`); the page shows the metric table, the
thresholds, image ROC and pixel F1 curves per class (plus the curve PNGs of ``evaluator.plots``)
and a gallery of panels (photo | heat map | predicted mask) for up to ``per_class`` images per
class, spread over the score order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from evaluation import thresholds as th
from evaluation.html_report import REPORT_FILE, GalleryItem, line_chart, table_html, write_report
from evaluation.panels import SCALE_TEXT, panel
from evaluation.plots import safe_name

_LOG = logging.getLogger("mambaad.evaluator")
GALLERY_FOLDER = "report_files"


def _photo(path: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return np.asarray(im.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def image_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (FPR, TPR) of image scores, one per distinct score; empty if a class is absent."""
    y = np.asarray(labels).reshape(-1) > 0
    if y.all() or not y.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.r_[0, np.cumsum(y[order])]
    fp = np.r_[0, np.cumsum(~y[order])]
    return fp / fp[-1], tp / tp[-1]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def threshold_rows(thresholds: Mapping[str, Any]) -> list[list[str]]:
    """One row per class and the overall values: thresholds and the F1 they reach."""
    rows = []
    for name, t in [*thresholds["classes"].items(), (th.OVERALL, thresholds[th.OVERALL])]:
        rows.append(
            [
                name,
                _num(t["image"]),
                _pct(t["image_f1"]),
                _num(t["pixel"]),
                _pct(t["pixel_f1"]),
                str(t["images"]),
            ]
        )
    return rows


def write_evaluation_outputs(
    stores: Mapping[str, Any],
    results: Mapping[str, Mapping[str, float]],
    out_dir: str | Path,
    read_image: Callable[[str, tuple[int, int]], np.ndarray] | None = None,
    per_class: int = 12,
) -> dict[str, Any]:
    """Write ``thresholds.json`` (see :func:`evaluation.thresholds.evaluation_target`) and ``report.html``
    to ``out_dir``; returns the thresholds. ``stores``: the evaluator's per-class stores."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = (
        (cls, np.concatenate(s.scores), np.concatenate(s.labels), s.maps, s.masks)
        for cls, s in sorted(stores.items())
    )
    thresholds = th.calibrate(items, split="test", source="evaluation", note=th.TEST_SPLIT_NOTE)
    target = th.save(thresholds, th.evaluation_target(out))
    if target.name != th.THRESHOLDS_FILE:
        _LOG.info(
            "thresholds.json comes from tools/calibrate.py and is kept; this evaluation's are in %s", target
        )
    metric_names = list(next(iter(results.values())).keys())
    rows = [[cls, *(_pct(row.get(m)) for m in metric_names)] for cls, row in results.items()]
    tables = [
        table_html("metrics (x100)", ["class", *metric_names], rows),
        table_html(
            f"F1-maximising thresholds of the {thresholds['split']} split ({target.name})",
            ["class", "image threshold", "image F1", "pixel threshold", "pixel F1", "images"],
            threshold_rows(thresholds),
        ),
    ]
    figures: list[tuple[str, str]] = []
    lo, hi = thresholds["map_range"]
    lo, hi = (0.0, 1.0) if lo is None or hi is None or hi <= lo else (lo, hi)
    gallery: list[GalleryItem] = []
    for cls, store in sorted(stores.items()):
        t = thresholds["classes"][cls]
        scores, labels = np.concatenate(store.scores), np.concatenate(store.labels)
        fpr, tpr = image_roc(scores, labels)
        figures.append(
            (f"{cls}: image ROC", line_chart([("image ROC", fpr, tpr)], "FPR", "TPR", f"{cls} ROC"))
        )
        curve = np.array(t["pixel_f1_curve"], dtype=np.float64).reshape(-1, 2)
        figures.append(
            (
                f"{cls}: pixel F1 against the threshold (dashed: chosen)",
                line_chart(
                    [("pixel F1", curve[:, 0], curve[:, 1])], "threshold", "F1", f"{cls} pixel F1", t["pixel"]
                ),
            )
        )
        for kind in ("roc", "pr", "pro"):
            png = out / "curves" / f"{safe_name(cls)}_{kind}.png"
            if png.is_file():
                figures.append((f"{cls}: {kind.upper()} (evaluator.plots)", png.relative_to(out).as_posix()))
        gallery += _gallery(cls, store, scores, labels, thresholds, out, (lo, hi), read_image, per_class)
    legend = SCALE_TEXT.format(vmin=f"{lo:.4g}", vmax=f"{hi:.4g}") + " (panels at the model's input size)"
    write_report(
        out / REPORT_FILE,
        f"Evaluation of {out.name}",
        [
            f"{sum(s.n for s in stores.values())} test images in {len(stores)} class(es); values x100.",
            f"Decisions use the thresholds above: {thresholds['note']}.",
        ],
        tables,
        figures,
        gallery,
        legend,
    )
    return thresholds


def _gallery(
    cls: str,
    store: Any,
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: Mapping[str, Any],
    out: Path,
    scale: tuple[float, float],
    read_image: Callable[[str, tuple[int, int]], np.ndarray] | None,
    per_class: int,
) -> list[GalleryItem]:
    """Panels of up to ``per_class`` images of ``cls`` spread evenly over its score order."""
    if len(store.img_paths) != store.n or per_class < 1:
        return []
    t, overall = thresholds["classes"][cls], thresholds[th.OVERALL]
    img_t = t["image"] if t["image"] is not None else overall["image"]
    pix_t = t["pixel"] if t["pixel"] is not None else overall["pixel"]
    order = np.argsort(-scores, kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(per_class, len(order))).round().astype(int))]
    folder = out / GALLERY_FOLDER / safe_name(cls)
    folder.mkdir(parents=True, exist_ok=True)
    maps = store.maps()
    items = []
    for i in picks:
        amap = np.asarray(maps[i], np.float32)
        size = amap.shape
        path = store.img_paths[i]
        photo = read_image(path, size) if read_image is not None else _photo(path, size)
        mask = amap >= pix_t if pix_t is not None else None
        decision = "anomalous" if img_t is not None and scores[i] >= img_t else "normal"
        truth = "anomalous" if labels[i] else "normal"
        text = f"{cls} | score {scores[i]:.4g} | ground truth {truth} | {Path(path).name}"
        name = f"{i:05d}.png"
        Image.fromarray(panel(photo, amap, mask, scale[0], scale[1], text, pix_t)).save(folder / name)
        items.append(
            GalleryItem((folder / name).relative_to(out).as_posix(), cls, decision, float(scores[i]), text)
        )
    return items
