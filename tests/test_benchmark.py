"""tools/benchmark.py end to end at a tiny size: JSON structure and positive numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from model.ops.selective_scan import available_backends

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(value):
    """Every measured number in the report (stage indices excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for key, v in value.items():
            if key != "stage":
                yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def test_stage_shapes_follow_the_paper_model():
    shapes = _load_benchmark().stage_shapes(256)
    assert [(s["L"], s["d_inner"]) for s in shapes] == [(64, 1024), (256, 512), (1024, 256), (4096, 128)]


def test_benchmark_quick_run(tmp_path, capsys):
    bench = _load_benchmark()
    backends = [b for b in ("cpu", "ref") if b in available_backends()]
    if "ref" not in backends:
        pytest.skip("ref backend missing")
    out = tmp_path / "bench.json"
    args = ["--quick", "--image-size", "64", "--repeats", "1", "--out", str(out), "--backends", *backends]
    bench.main(args)
    report = json.loads(out.read_text())
    assert {"machine", "image_size", "scan", "inference", "speedup_vs_ref", "train_cpu"} <= set(report)
    assert report["image_size"] == 64
    assert {"cpu_count", "torch", "device", "date"} <= set(report["machine"])
    assert len(report["scan"]) == 4 * len(backends)
    for row in report["scan"]:
        assert "skipped" in row or {"forward_s", "forward_backward_s"} <= set(row)
    assert [r["backend"] for r in report["inference"]] == backends
    assert all("images_per_s" in r for r in report["inference"])
    assert {"seconds_per_step", "peak_rss_mib"} <= set(report["train_cpu"])
    assert all(v > 0 for v in _numbers(report))
    table = capsys.readouterr().out
    assert table.startswith("| measurement |") and "speed-up vs ref" in table


def test_data_parallel_throughput_rows():
    """1 process vs 2 torchrun (Gloo) processes at one global batch: both rows measured."""
    bench = _load_benchmark()
    result = bench.bench_ddp(image_size=64, batch=2, repeats=1)
    assert [r["processes"] for r in result["runs"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in result["runs"])
    assert result["two_vs_one"] == result["runs"][1]["images_per_s"] / result["runs"][0]["images_per_s"]
    table = bench.markdown_table({"scan": [], "inference": [], "image_size": 64, "train_ddp": result})
    assert "train images/s, 2 process(es)" in table and "2 processes vs 1" in table


def test_mmad_variant_rows():
    """--mmad: inference and a CPU training step of the four MMAD-style variants, side by side."""
    bench = _load_benchmark()
    backend = "cpu" if "cpu" in available_backends() else "ref"
    rows = bench.bench_mmad(backend, image_size=64, repeats=1, device=torch.device("cpu"))
    assert [(r["grouped"], r["bottleneck"]) for r in rows] == list(bench.MMAD_VARIANTS)
    assert all(r["inference"]["images_per_s"] > 0 and r["train"]["seconds_per_step"] > 0 for r in rows)
    table = bench.markdown_table({"scan": [], "inference": [], "image_size": 64, "mmad": rows})
    assert f"| train step (s) | {backend}, grouped scan, dilated_mamba |" in table
    assert f"{backend}, full scan, hfpn" in table


def test_methods_are_timed_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    from tools import bench_methods

    argv = ["--configs", "configs/mambaad_demo.py", "configs/uniad_demo.py", "--image-size", "64"]
    assert bench_methods.main([*argv, "--batch", "2", "--repeats", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| config | params (M) |") and len(lines) == 4
    mambaad, uniad = (line.split("|")[1:-1] for line in lines[2:])
    assert mambaad[0].strip() == "mambaad_demo" and uniad[0].strip() == "uniad_demo"
    assert float(mambaad[3]) == 1.0 and float(mambaad[5]) == 1.0  # ratios to the first method
    assert 24.0 < float(uniad[1]) < 24.6  # UniAD: 24.52 M at 256x256, a little less at 64 (fewer queries)
    assert all(float(cell) > 0 for cell in (*uniad[2:], *mambaad[2:]))
