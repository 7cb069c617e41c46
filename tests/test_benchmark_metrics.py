"""tools/benchmark_metrics.py on a tiny synthetic set: rows, JSON and exact == scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools.benchmark_metrics import class_sizes, main, synthetic_class


def test_synthetic_class_is_deterministic_and_mixed() -> None:
    maps, masks, labels = synthetic_class(5, 40, 32)
    again = synthetic_class(5, 40, 32)
    assert np.array_equal(maps, again[0]) and np.array_equal(masks, again[1])
    assert maps.dtype == np.float32 and maps.shape == (40, 32, 32) and maps.min() == 0
    has_defect = masks.reshape(40, -1).any(axis=1)
    assert np.array_equal(has_defect, labels > 0) and 0 < labels.sum() < 40
    assert class_sizes(1725, 15) == [115] * 15 and sum(class_sizes(100, 7)) == 100


def test_benchmark_rows_and_agreement_with_sklearn(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["--images", "24", "--classes", "2", "--size", "32", "--out", str(out)]
    assert main([*args, "--groups", "exact", "sklearn", "--metrics", "P-AUROC", "I-AP", "all"]) == 0
    assert "| exact | P-AUROC |" in capsys.readouterr().out
    entry = json.loads(out.read_text())["synthetic_24x32_2cls"]
    rows = {(r["impl"], r["metric"]): r for r in entry["rows"]}
    assert set(rows) == {("exact", "P-AUROC"), ("exact", "I-AP"), ("exact", "all")} | {
        ("sklearn", "P-AUROC"),
        ("sklearn", "I-AP"),
    }
    for name in ("P-AUROC", "I-AP"):
        exact, sk = rows[("exact", name)]["values"][name], rows[("sklearn", name)]["values"][name]
        assert exact == pytest.approx(sk, abs=1e-6)
    assert all(r["peak_rss_mb"] >= r["start_rss_mb"] > 0 and r["seconds"] >= 0 for r in rows.values())
    # a second run merges into the same file
    assert main([*args, "--groups", "ader", "--metrics", "AUPRO"]) == 0
    entry = json.loads(out.read_text())["synthetic_24x32_2cls"]
    assert ("ader", "AUPRO") in {(r["impl"], r["metric"]) for r in entry["rows"]} and len(entry["rows"]) == 6


def test_torch_row_equals_the_exact_row(tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = ["--images", "24", "--classes", "2", "--size", "32", "--out", str(out), "--metrics", "all"]
    assert main([*args, "--groups", "exact", "torch"]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["synthetic_24x32_2cls"]["rows"]}
    assert set(rows) == {"exact", "torch-cpu"} and rows["torch-cpu"]["metric"] == "all"
    exact, torch_values = rows["exact"]["values"], rows["torch-cpu"]["values"]
    assert list(torch_values) == list(exact) and len(exact) == 8  # seven metrics and mAD
    assert torch_values == pytest.approx(exact, abs=1e-9)
    assert rows["torch-cpu"]["seconds"] > 0
