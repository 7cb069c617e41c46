"""ROC, PR and PRO curve figures per class (PNG, matplotlib with the Agg backend, imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (plots work on headless machines)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "evaluator.plots=True and vis=True need matplotlib: .venv/bin/pip install matplotlib==3.11.2"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    """A class name usable as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def save_curves(
    curves: Mapping[str, Any], cls: str, values: Mapping[str, float], out_dir: str | Path
) -> list[Path]:
    """Write ``<cls>_roc.png``, ``<cls>_pr.png`` and ``<cls>_pro.png`` into ``out_dir``.

    ``curves`` holds the points filled in by ``compute_metrics(..., curves=...)`` (image and pixel
    ROC / PR, PRO); ``values`` the class's metrics for the legends. Curves that are undefined for
    the class (e.g. no anomalous pixels) are left out; returns the files written.
    """
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        ("roc", "FPR", "TPR", [("image", "image_roc_fpr", "image_roc_tpr", "I-AUROC"),
                               ("pixel", "pixel_roc_fpr", "pixel_roc_tpr", "P-AUROC")]),
        ("pr", "recall", "precision", [("image", "image_pr_recall", "image_pr_precision", "I-AP"),
                                       ("pixel", "pixel_pr_recall", "pixel_pr_precision", "P-AP")]),
        ("pro", "FPR", "PRO", [("pixel", "pro_fpr", "pro_pro", "AUPRO")]),
    ]  # fmt: skip
    written = []
    for kind, xlabel, ylabel, lines in specs:
        present = [line for line in lines if line[1] in curves and len(curves[line[1]])]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=100)
        for label, xkey, ykey, metric in present:
            value = values.get(metric, float("nan"))
            ax.plot(
                np.asarray(curves[xkey]),
                np.asarray(curves[ykey]),
                label=f"{label} {metric} {100 * value:.2f}",
            )
        if kind == "pro":
            ax.axvline(0.3, color="gray", linestyle="--", linewidth=0.8)
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"{cls}: {kind.upper()}")
        ax.legend(loc="lower right" if kind != "pr" else "lower left", fontsize=8)
        fig.tight_layout()
        path = out / f"{safe_name(cls)}_{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
