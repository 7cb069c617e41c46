"""report.html in a real headless browser (Chromium): the page's script runs without errors, the
DOM holds the metric table and the gallery, and the screenshot is not blank.

Skipped where no Chromium is installed (``.ci/run`` installs Debian's ``chromium`` when it can).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.evaluator import ADEvaluator
from model.build import build_model
from util.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import predict as predict_cli  # noqa: E402

BROWSER = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium: apt-get install -y chromium (.ci/run installs it as root)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]


def _browse(page: Path, tmp_path: Path) -> tuple[str, str, np.ndarray]:
    """The DOM after the page's scripts ran, the browser's log, and a 1200x1600 screenshot."""
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [BROWSER, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    shot = tmp_path / "shot.png"
    subprocess.run(
        [BROWSER, *FLAGS, "--window-size=1200,1600", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dom.stdout, dom.stderr, np.asarray(Image.open(shot).convert("L"), np.float64)


def _check(page: Path, tmp_path: Path, cards: int) -> np.ndarray:
    dom, log, pixels = _browse(page, tmp_path)
    assert 'data-ready="1"' in dom, "the page's script did not finish"
    assert f"{cards} of {cards} images shown" in dom
    assert dom.count('class="card ') == cards and '<table class="metrics">' in dom
    assert "Uncaught" not in log, log
    assert pixels.shape == (1600, 1200) and pixels.std() > 20  # text, tables, pictures: not blank
    return pixels


def test_evaluation_report_in_a_browser(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    maps, masks = torch.rand(8, 32, 32), torch.zeros(8, 32, 32)
    masks[[2, 3, 6, 7], 5:15, 5:15] = 1
    maps[[2, 3, 6, 7], 5:15, 5:15] += 1
    ev = ADEvaluator(device="cpu")
    ev.update(
        maps,
        maps.flatten(1).amax(1),
        masks,
        torch.tensor([0, 0, 1, 1] * 2),
        ["a"] * 4 + ["b"] * 4,
        None,
        paths,
    )
    run = tmp_path / "run"
    run.mkdir()
    ev.compute(out_dir=run)
    _check(run / "report.html", tmp_path, 8)


def test_predict_report_in_a_browser(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(
        REPO / "configs/mambaad_demo.py",
        [
            "model.depths=[2,2,2,2]",
            "model.teacher.name=resnet18",
            "data.image_size=64",
            "model.scan.directions=2",
        ],
    )
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.json")
    torch.save(build_model(cfg, logging.getLogger("test_report")).state_dict(), run / "net.pth")
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 100), (80, 30), (64, 64)]):
        path = tmp_path / "in" / ("left" if i % 2 else "right") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(run),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--threshold",
        "0",
    ]
    assert predict_cli.main(argv) == 0
    _check(out / "report.html", tmp_path, 3)
