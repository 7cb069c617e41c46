"""tools/gpu_check.py off a GPU: the budget, partial results, the DDP section on Gloo with the real
model and the launch section under Triton's interpreter (``--device cpu``), and the report."""

from __future__ import annotations

import json
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tools import gpu_check, gpu_sections

TINY = ["--device", "cpu", "--image-size", "64", "--width-divisor", "256", "--stages", "0"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_without_cuda(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_default_report_folder_is_the_device_machines_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.default_out() == tmp_path / "gpu_check"
    monkeypatch.delenv("OUT")
    assert gpu_check.default_out() == Path("gpu_report")


def _report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


def test_the_budget_cuts_a_section_and_skips_the_rest(tmp_path):
    # selftest records a value, then sleeps far past its limit (15 s): it is stopped, its value
    # kept; the 30 s budget then leaves less than a section needs to start
    start = time.perf_counter()
    args = [*TINY, "--out", str(tmp_path), "--only", "selftest", "env", "--budget", "30"]
    assert gpu_check.main([*args, "--selftest-sleep", "600"]) == 1
    assert time.perf_counter() - start < 30 + gpu_check.KILL_GRACE_S
    report = _report(tmp_path)
    assert "cut" in report["selftest"] and report["selftest"]["before_sleep"] is True
    assert report["env"] == {"skipped": "budget of 30 s spent"}
    assert "| env | skipped: budget of 30 s spent |" in (tmp_path / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One interpreted run of the sections a CPU can run, with a section that runs over."""
    out = tmp_path_factory.mktemp("gpu_check")
    args = [*TINY, "--out", str(out), "--only", "env", "selftest", "ddp", "launch", "--selftest-sleep", "600"]
    return gpu_check.main(args), out


def test_a_section_past_its_limit_is_cut_and_the_rest_still_run(cpu_check):
    code, out = cpu_check
    report = _report(out)
    assert code == 1  # the cut section counts as a failure
    cut = report["selftest"]
    assert "cut" in cut and cut["before_sleep"] is True and "after_sleep" not in cut
    assert cut["section_seconds"] < gpu_check.SECTION_LIMITS["selftest"] + gpu_check.KILL_GRACE_S + 2
    assert report["env"]["ok"] and report["env"]["triton_interpret"] is True
    summary = (out / "gpu_check.md").read_text()
    assert "| selftest | CUT (partial) |" in summary and "| env | ok |" in summary


def test_ddp_section_trains_the_real_model_through_the_trainers_wrapping(cpu_check):
    # two Gloo ranks: SyncBatchNorm, DDP without conv33 (unused in forward), two steps; plain
    # DDP over all parameters stops at the second step ("Expected to have finished reduction")
    ddp = _report(cpu_check[1])["ddp"]
    assert ddp["ok"], ddp
    assert ddp["world_size"] == 2 and ddp["ddp"] == "DistributedDataParallel"
    assert ddp["sync_bn_layers"] > 0 and len(ddp["losses"]) == 2 and ddp["grads_finite"]


def test_launch_section_checks_every_warps_setting_and_suggests_a_table(cpu_check):
    launch = _report(cpu_check[1])["launch"]
    assert launch["ok"] and launch["timings_meaningful"] is False
    rows = launch["rows"]
    assert {r["num_warps"] for r in rows} == set(gpu_sections.WARPS)
    assert {r["batch"] for r in rows} == {1, 2} and all(r["ok"] and r["max_rel_err"] < 1e-5 for r in rows)
    table = launch["suggested_table"]
    assert set(table) == {"('fwd', 8, 4, 16, 4)", "('bwd', 8, 4, 16, 4)"}
    assert all(block == 4 and warps in gpu_sections.WARPS for block, warps in table.values())
    assert "LAUNCH_TABLE = {" in (cpu_check[1] / "gpu_check.md").read_text()


def test_bench_keeps_what_it_measured_when_one_measurement_fails(tmp_path, monkeypatch):
    import tools.benchmark as bench

    def scan(backend, shape, repeats, device):
        if shape["stage"] == 1:
            raise RuntimeError("an illegal memory access was encountered")
        return {"forward_s": 0.001, "forward_backward_s": 0.003}

    monkeypatch.setattr("model.ops.selective_scan.available_backends", lambda: ["triton"])
    monkeypatch.setattr(bench, "bench_scan", scan)
    monkeypatch.setattr(
        bench, "bench_inference", lambda b, size, r, d, batch: {"batch": batch, "images_per_s": 9.0}
    )
    monkeypatch.setattr(
        bench, "bench_train_cuda", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError())
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rec = gpu_sections.Recorder(tmp_path / "bench.json")
    args = Namespace(device="cuda", image_size=256)
    result = gpu_sections.check_bench(args, rec)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert result == {"ok": False}
    assert [("failed" in r) for r in saved["scan"]] == [False, True, False, False]
    assert "illegal memory access" in saved["scan"][1]["failed"]
    assert [r["batch"] for r in saved["inference"]] == [1, 16]
    assert saved["train"] == [{"backend": "triton", "skipped": "out of GPU memory"}]


def test_markdown_renders_a_full_report():
    err = {"y": 1e-6, "du": 2e-5}
    report = {
        "env": {"ok": True, "date": "2026-11-28", "gpu": "H200", "torch": "2.11", "auto_backend": "triton"},
        "tests": {"ok": True, "summary": "3 passed", "section_seconds": 12.0},
        "scan": {
            "ok": False,
            "rows": [
                {"stage": 0, "backend": "triton", "batch": 4, "ok": True, "rel_err": err},
                {"stage": 0, "backend": "triton", "batch": 16, "bit_identical": False, "repeats": 10},
                {"stage": 0, "backend": "triton (split)", "batch": 16, "rel_err_vs_whole": 0.0},
            ],
        },
        "ddp": {"skipped": "budget of 480 s spent"},
        "launch": {
            "ok": False,
            "cut": "stopped after 150 s",
            "rows": [
                {"stage": 3, "L": 4096, "batch": 16, "block": 8, "num_warps": 2, "ok": False}
                | {"forward_ms": 1.5, "backward_ms": 4.25, "max_rel_err": 0.5}
            ],
            "suggested_table": {"('fwd', 8, 128, 16, 4096)": [8, 2]},
        },
        "metrics": {
            "ok": True,
            "maps": "2000 x 256x256 float16",
            "seconds": 3.5,
            "peak_gpu_gib": 2.0,
            "subset_max_abs_diff_vs_numpy": 0.0,
        },
        "bench": {
            "ok": False,
            "scan": [
                {"stage": 0, "L": 64, "backend": "triton", "forward_s": 0.001, "forward_backward_s": None}
            ],
            "inference": [{"backend": "triton", "batch": 16, "images_per_s": 400.0}],
            "train": [
                {
                    "backend": "triton",
                    "resolved_backend": "triton",
                    "fp32": {"images_per_s": 90.0, "peak_memory_mib": 20000.0},
                    "bf16_autocast": {"images_per_s": 150.0, "peak_memory_mib": 12000.0},
                },
                {"backend": "chunked", "skipped": "out of GPU memory"},
                {"backend": "mamba_ssm", "failed": "RuntimeError: boom"},
            ],
        },
    }
    text = gpu_check.markdown(report)
    assert "| scan | FAILED |" in text and "| ddp | skipped: budget of 480 s spent |" in text
    assert "| launch | CUT (partial) |" in text
    assert "| 3 (4096) | 16 | 8 | 2 | 1.500 | 4.250 | 5.0e-01 FAILED |" in text
    assert "    ('fwd', 8, 128, 16, 4096): (8, 2)," in text
    assert "10 backward passes bit-identical: False" in text and "max rel err 2.0e-05 (ok)" in text
    assert "| 0 (L=64) | triton | 1.00 | - |" in text
    assert "| bf16_autocast | triton | 150.0 | 12000 |" in text and "out of GPU memory" in text
    assert "| - | mamba_ssm | RuntimeError: boom | - |" in text
    assert "2000 x 256x256 float16: 3.50 s, peak 2.00 GiB" in text
