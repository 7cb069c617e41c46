"""Reports of an evaluation: markdown tables, the maxima over evaluations, metrics.json and metrics.csv.

Values are fractions in [0, 1]; tables show them x100. Undefined metrics (nan) read ``n/a`` in
tables, null in ``metrics.json`` (strict JSON, no bare NaN) and an empty cell in ``metrics.csv``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.metrics_exact import average_over_classes, metric_columns, with_mad

# Rows named "<class>/<group>" and "mean/<group>" (MVTec LOCO AD's logical / structural anomalies)
# are shown after the mean row and left out of it.
GROUP_SEP = "/"


def _cell(value: float | None, epoch: Any = None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100.0 * value:.2f}" + (f" (e{epoch})" if epoch is not None else "")


def format_rows(
    rows: Mapping[str, Mapping[str, float]], epochs: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """Markdown table of ``rows`` as given (one row per key), values x100 with 2 decimals.

    Undefined (nan or None) values read ``n/a``; with ``epochs``, each value is followed by the
    epoch it comes from, e.g. ``97.12 (e50)``.
    """
    header = ["class", *next(iter(rows.values()))]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
    ]
    for name, row in rows.items():
        at = (epochs or {}).get(name, {})
        cells = [name, *(_cell(row.get(c), at.get(c)) for c in header[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _coverage_notes(
    rows: Mapping[str, Mapping[str, float]],
    columns: Sequence[str],
    reasons: Mapping[str, Mapping[str, str]] | None,
) -> list[str]:
    """One line per group of columns whose class mean leaves out the same classes, and one for mAD."""
    n = len(rows)
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for c in columns:
        missing = tuple(
            (cls, (reasons or {}).get(cls, {}).get(c, "gives no defined value"))
            for cls, row in rows.items()
            if math.isnan(row[c])
        )
        if missing:
            groups.setdefault(missing, []).append(c)
    notes = [
        f"* mean of {', '.join(cols)} over {n - len(missing)} of {n} classes "
        f"({'; '.join(f'{cls} {why}' for cls, why in missing)})"
        for missing, cols in groups.items()
    ]
    no_mad = [cls for cls, row in rows.items() if math.isnan(row["mAD"])]
    if no_mad:
        notes.append(
            f"* mAD is n/a for {', '.join(no_mad)} (not all seven metrics defined); "
            "the mean row's mAD is the mean of its seven means"
        )
    return notes


def format_table(
    per_class: Mapping[str, Mapping[str, float]], reasons: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    """Markdown table: one row per class and a final ``mean`` row, metrics x100 with 2 decimals.

    ``mAD`` is the mean of a row's standard metrics; sample-level columns (``S-AUROC``, ``S-AP``,
    ``S-F1max``) are shown after it when any class has them. Undefined (nan) values read ``n/a``
    and, below the table, a note per affected mean says over how many classes it averages and why
    the others are left out (``reasons[cls][metric]``, a phrase such as "has no anomalous test
    image", e.g. from ``ADEvaluator.undefined``).
    """
    plain = {name: row for name, row in per_class.items() if GROUP_SEP not in name}
    columns = metric_columns(plain)
    rows = {name: with_mad(row, columns) for name, row in plain.items()}
    notes = _coverage_notes(rows, columns, reasons)
    rows["mean"] = average_over_classes(plain)
    rows.update({name: with_mad(row, columns) for name, row in per_class.items() if GROUP_SEP in name})
    table = format_rows(rows)
    return table + ("\n\n" + "\n".join(notes) if notes else "")


def max_over_evaluations(
    history: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Per row (class or ``mean``) and metric, the highest value over ``history`` and its epoch.

    ``history`` holds evaluations as the trainer records them (``{"epoch", "results"}``). This
    is what the official log prints as "(Max)": a selection on the test set, never the reported
    result. Undefined values are skipped; a metric never defined stays nan with epoch None. Ties
    keep the earliest evaluation.
    """
    best: dict[str, dict[str, float]] = {}
    epochs: dict[str, dict[str, Any]] = {}
    for entry in history:
        for row_name, row in entry["results"].items():
            row_best = best.setdefault(row_name, {})
            row_epochs = epochs.setdefault(row_name, {})
            for metric, value in row.items():
                v = math.nan if value is None else float(value)
                current = row_best.setdefault(metric, math.nan)
                row_epochs.setdefault(metric, None)
                if not math.isnan(v) and (math.isnan(current) or v > current):
                    row_best[metric] = v
                    row_epochs[metric] = entry.get("epoch")
    return best, epochs


def json_ready(obj: Any) -> Any:
    """``obj`` with every nan or infinite float (also numpy scalars) replaced by None, for strict JSON."""
    if isinstance(obj, Mapping):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_metrics(run_dir: str | Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Write ``metrics.json`` (the final evaluation, the history, the maxima over it) and ``metrics.csv``.

    ``history`` holds the evaluations in order (``{"epoch", "step", "num_images", "results"}``); the
    last is the reported result. The JSON is replaced atomically.
    """
    run_dir = Path(run_dir)
    final = history[-1]
    best, at = max_over_evaluations(history)
    payload = {
        "final": final,
        "history": list(history),
        "max_over_evaluations": {
            "note": "per class and metric, the maximum over the evaluations in history: a selection "
            "on the test set, not the reported result (that is final)",
            "results": best,
            "epoch": at,
        },
        "note": "values are fractions in [0, 1]; null = undefined (e.g. no anomalous test image)",
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(json_ready(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(run_dir / "metrics.json")
    names = list(next(iter(final["results"].values())).keys())
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "class", *names])
        for entry in history:
            for cls, values in entry["results"].items():
                cells = ("" if math.isnan(v := values.get(n, math.nan)) else f"{v:.6f}" for n in names)
                writer.writerow([entry["epoch"], entry["step"], cls, *cells])
