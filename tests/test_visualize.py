"""Curve plots, case grids and the run-config loader of tools/visualize.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.default_ad import read_rgb
from evaluation.evaluator import ADEvaluator
from evaluation.metrics import compute_metrics
from evaluation.visualize import pick_cases
from util.config import load_config, save_config
from util.run_config import load_run_config

pytest.importorskip("matplotlib")


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_pick_cases_orders_by_error() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.7])
    labels = np.array([1, 1, 0, 0, 1, 0])
    worst, best = pick_cases(scores, labels, n=2)
    # anomalous 0.1 (lowest score) and normal 0.8 (second highest) are the worst mistakes
    assert worst == [1, 2]
    assert best == [0, 3]
    assert not set(worst) & set(best)


def test_exact_curves_end_at_the_metric_values() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 12, 12), dtype=bool)
    masks[:2, 3:7, 3:7] = True
    maps = rng.random((4, 12, 12)) + 0.6 * masks
    curves: dict = {}
    out = compute_metrics(maps, masks, np.array([1, 1, 0, 0]), curves=curves)
    auc = np.trapezoid(curves["pixel_roc_tpr"], curves["pixel_roc_fpr"])
    assert auc == pytest.approx(out["P-AUROC"], abs=1e-9)
    f1 = 2 * curves["pixel_pr_precision"] * curves["pixel_pr_recall"]
    f1 /= curves["pixel_pr_precision"] + curves["pixel_pr_recall"]
    assert f1.max() == pytest.approx(out["P-F1max"], abs=1e-12)
    pred = maps >= curves["pixel_threshold"]
    assert 2 * (pred & masks).sum() / (pred.sum() + masks.sum()) == pytest.approx(out["P-F1max"])
    assert curves["pro_fpr"][0] == 0 and curves["pro_pro"][-1] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["exact", "ader"])
def test_evaluator_writes_curves_and_case_grids(tmp_path, mode: str) -> None:
    rng = np.random.default_rng(1)
    n, size = 8, 32
    paths = []
    for i in range(n):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    masks = np.zeros((n, 1, size, size), np.float32)
    masks[: n // 2, 0, 8:16, 8:16] = 1
    maps = torch.from_numpy(rng.random((n, size, size)).astype(np.float32) + masks[:, 0])
    labels = torch.tensor([1] * (n // 2) + [0] * (n // 2))
    ev = ADEvaluator(mode=mode, plots=True)
    names = ["bottle"] * 4 + ["wood/ x"] * 4
    ev.update(maps, maps.flatten(1).amax(1), torch.from_numpy(masks), labels, names, img_paths=paths)
    out = tmp_path / "run"
    ev.compute(out_dir=out, read_image=read_rgb)
    for kind in ("roc", "pr", "pro"):
        assert _png_size(out / "curves" / f"bottle_{kind}.png")[0] > 100
    assert not list((out / "curves").glob("wood*"))  # only normal images: every curve is undefined
    for cls in ("bottle", "wood__x"):  # class names become safe file names
        width, height = _png_size(out / "vis" / f"{cls}.png")
        assert width > 300 and height > 100
    ev.compute()  # no out_dir: no files, no error


def test_load_run_config_restores_saved_values(tmp_path) -> None:
    cfg = load_config("configs/mambaad_demo.py", ["trainer.epochs=3", "data.batch_size=4"])
    save_config(cfg, tmp_path / "config.json")
    loaded = load_run_config(tmp_path, ["data.num_workers=0"])
    assert loaded.trainer.epochs == 3 and loaded.data.batch_size == 4
    assert loaded.optim.lr == cfg.optim.lr and loaded.data.num_workers == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["config_file"]  # no config file named: the defaults class, with every saved value
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = load_run_config(tmp_path)
    assert again.trainer.epochs == 3 and again.data.root == cfg.data.root
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run_config(tmp_path)


def test_visualize_tool_reports_a_missing_run(tmp_path, capsys) -> None:
    from tools.visualize import main

    assert main([str(tmp_path)]) == 2
    assert "net.pth does not exist" in capsys.readouterr().err
    (tmp_path / "net.pth").write_bytes(b"")
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "data.num_workers=0"]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_run_folders_of_older_versions_load_with_moved_keys(tmp_path) -> None:
    cfg = load_config("configs/mambaad_demo.py")
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["sigma"]
    saved["evaluator"]["sigma"] = 2.5  # where the blur sigma lived before it moved to the model
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_run_config(tmp_path)
    assert loaded.model.sigma == 2.5 and not hasattr(loaded.evaluator, "sigma")
