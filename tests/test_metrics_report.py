"""What the run folder reports: strict metrics.json with nulls, CSV cells and the maxima over epochs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from evaluation.report import format_rows, json_ready, max_over_evaluations, write_metrics

NAN = math.nan


def _history() -> list[dict]:
    """Three evaluations; washer has no anomalous test image, so its image metrics are undefined."""
    rows = [
        ({"I-AUROC": 0.50, "mAD": 0.60}, {"I-AUROC": NAN, "mAD": NAN}),
        ({"I-AUROC": 0.90, "mAD": 0.70}, {"I-AUROC": NAN, "mAD": NAN}),
        ({"I-AUROC": 0.80, "mAD": 0.70}, {"I-AUROC": NAN, "mAD": NAN}),
    ]
    return [
        {
            "epoch": 10 * (i + 1),
            "step": 100 * (i + 1),
            "num_images": 5,
            "results": {"weave": weave, "washer": washer, "mean": dict(weave)},
        }
        for i, (weave, washer) in enumerate(rows)
    ]


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} in metrics.json")

    return json.loads(text, parse_constant=refuse)


def test_max_over_evaluations_takes_the_best_epoch_and_skips_undefined_values() -> None:
    best, epochs = max_over_evaluations(_history())
    assert best["weave"] == {"I-AUROC": 0.90, "mAD": 0.70} and epochs["weave"] == {"I-AUROC": 20, "mAD": 20}
    assert best["mean"]["I-AUROC"] == 0.90  # the max of the mean row, as the official log prints it
    assert math.isnan(best["washer"]["I-AUROC"]) and epochs["washer"]["I-AUROC"] is None
    table = format_rows(best, epochs).splitlines()
    assert table[2] == "| weave | 90.00 (e20) | 70.00 (e20) |"
    assert table[3] == "| washer | n/a | n/a |"


def test_json_ready_replaces_non_finite_floats_with_null() -> None:
    obj = {"a": [NAN, 1.5, math.inf], "b": {"c": float("-inf")}, "d": "nan"}
    assert json_ready(obj) == {"a": [None, 1.5, None], "b": {"c": None}, "d": "nan"}


def test_metrics_files_are_strict_json_with_nulls_and_hold_the_maxima(tmp_path: Path) -> None:
    write_metrics(tmp_path, _history())
    data = _strict_json((tmp_path / "metrics.json").read_text())
    assert data["final"]["results"]["washer"]["I-AUROC"] is None
    assert data["final"]["results"]["weave"]["I-AUROC"] == 0.80  # the last epoch, not the best one
    maxima = data["max_over_evaluations"]
    assert maxima["results"]["weave"]["I-AUROC"] == 0.90 and maxima["epoch"]["weave"]["I-AUROC"] == 20
    assert maxima["results"]["washer"]["I-AUROC"] is None
    assert "not the reported result" in maxima["note"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    washer = [r for r in rows if r["class"] == "washer"]
    assert [r["I-AUROC"] for r in washer] == ["", "", ""]
    assert float(rows[0]["I-AUROC"]) == pytest.approx(0.5)
