"""tools/gpu_check.py off a GPU: it refuses cleanly, and its report renders every section."""

from __future__ import annotations

import pytest
import torch

from tools import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_without_cuda(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_markdown_renders_a_full_report():
    err = {"y": 1e-6, "du": 2e-5}
    report = {
        "env": {"ok": True, "date": "2026-11-28", "gpu": "H200", "torch": "2.11", "auto_backend": "triton"},
        "tests": {"ok": True, "summary": "3 passed", "section_seconds": 12.0},
        "scan": {
            "ok": False,
            "rows": [
                {"stage": 0, "backend": "triton", "batch": 4, "ok": True, "rel_err": err},
                {"stage": 0, "backend": "triton", "batch": 16, "bit_identical": False},
                {"stage": 0, "backend": "triton (split)", "batch": 16, "rel_err_vs_whole": 0.0},
            ],
        },
        "ddp": {"skipped": "budget of 480 s spent"},
        "metrics": {
            "ok": True,
            "maps": "2000 x 256x256 float16",
            "seconds": 3.5,
            "peak_gpu_gib": 2.0,
            "subset_max_abs_diff_vs_numpy": 0.0,
        },
        "bench": {
            "ok": True,
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
            ],
        },
    }
    text = gpu_check.markdown(report)
    assert "| scan | FAILED |" in text and "| ddp | skipped: budget of 480 s spent |" in text
    assert "bit-identical: False" in text and "max rel err 2.0e-05 (ok)" in text
    assert "| 0 (L=64) | triton | 1.00 | - |" in text
    assert "| bf16_autocast | triton | 150.0 | 12000 |" in text and "skipped: out of GPU memory" in text
    assert "2000 x 256x256 float16: 3.50 s" in text
