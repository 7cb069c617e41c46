"""Calibrated decisions (issue 25): thresholds saved by evaluations and tools/calibrate.py, used and
overridden by predict and the API, outputs at the photo's own size, an interrupted predict."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.runtime import resize_map
from evaluation import thresholds as th
from evaluation.evaluator import ADEvaluator
from mambaad import load_model, predict
from model.build import build_model
from util.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import calibrate  # noqa: E402
import predict as predict_cli  # noqa: E402

SMALL = [
    "model.depths=[2,2,2,2]",
    "model.teacher.name=resnet18",
    "data.image_size=64",
    "model.scan.directions=2",
]


def _photo(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("decisions_run")
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/mambaad_demo.py", SMALL)
    save_config(cfg, run / "config.json")
    torch.save(build_model(cfg, logging.getLogger("test_decisions")).state_dict(), run / "net.pth")
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Non-square photos: two of the calibrated class ``bottle``, one of an unknown class, one at the top."""
    root = tmp_path_factory.mktemp("photos")
    _photo(root / "bottle" / "a.png", 30, 70, 1)
    _photo(root / "bottle" / "b.png", 50, 20, 2)
    _photo(root / "screw" / "c.png", 64, 64, 3)
    _photo(root / "d.png", 45, 90, 4)
    return root


@pytest.fixture(scope="module")
def calibrated(run_dir: Path, photos: Path) -> dict:
    """A thresholds.json for ``bottle`` set between its two images' scores; overall values apart."""
    model = load_model(run_dir)
    files = sorted(photos.rglob("*.png"))
    ref = predict(model, files)
    by_name = dict(zip([p.relative_to(photos).as_posix() for p in files], ref.scores.tolist(), strict=True))
    bottle = sorted([by_name["bottle/a.png"], by_name["bottle/b.png"]])
    values = np.sort(ref.maps.reshape(-1))
    thresholds = {
        "source": "evaluation",
        "split": "test",
        "note": th.TEST_SPLIT_NOTE,
        "overall": {"image": float(values[-1]) + 1.0, "pixel": float(values[len(values) // 2]), "images": 4},
        "classes": {
            "bottle": {"image": (bottle[0] + bottle[1]) / 2, "pixel": float(values[len(values) // 4])}
        },
        "map_range": [float(values[0]), float(values[-1])],
    }
    th.save(thresholds, run_dir / th.THRESHOLDS_FILE)
    return {"thresholds": thresholds, "scores": by_name, "maps": dict(zip(by_name, ref.maps, strict=True))}


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {r["image"]: r for r in csv.DictReader((out / "scores.csv").read_text().splitlines())}


def test_thresholds_maximise_f1_by_brute_force() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.random(40), rng.random(40) < 0.4
    t, f1 = th.image_threshold(scores, labels)
    brute = max(2 * (labels & (scores >= c)).sum() / ((scores >= c).sum() + labels.sum()) for c in scores)
    assert f1 == pytest.approx(brute) and 2 * (labels & (scores >= t)).sum() / ((scores >= t).sum() + 16) > 0
    maps = rng.random((4, 9, 7)).astype(np.float16)
    masks = rng.random((4, 9, 7)) < 0.3
    t, f1 = th.pixel_threshold(th.pixel_counts(maps, masks))
    v, m = maps.astype(np.float32).ravel(), masks.ravel()
    brute = max(2 * (m & (v >= c)).sum() / ((v >= c).sum() + m.sum()) for c in np.unique(v))
    assert f1 == pytest.approx(brute)
    assert 2 * (m & (v >= t)).sum() / ((v >= t).sum() + m.sum()) == pytest.approx(brute)
    assert np.isnan(th.image_threshold(scores, np.zeros(40))[0])


def test_evaluation_saves_thresholds_and_report_and_keeps_a_calibrated_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = [str(_photo(tmp_path / "img" / f"{i}.png", 24, 40, i)) for i in range(8)]
    maps = torch.from_numpy(rng.random((8, 16, 16)).astype(np.float32))
    masks = torch.zeros(8, 16, 16)
    anomalous = [2, 3, 6, 7]
    masks[anomalous, 3:9, 3:9] = 1
    maps[anomalous, 3:9, 3:9] += 0.3  # overlapping values: pixel F1 below 1
    scores = maps.flatten(1).amax(1)
    ev = ADEvaluator(device="cpu")
    ev.update(maps, scores, masks, torch.tensor([0, 0, 1, 1] * 2), ["a"] * 4 + ["b"] * 4, img_paths=paths)
    run = tmp_path / "run"
    run.mkdir()
    results = ev.compute(out_dir=run)
    saved = json.loads((run / "thresholds.json").read_text())
    for cls in ("a", "b"):  # the F1 reached equals the metrics' F1-max (both exact over float16 maps)
        assert saved["classes"][cls]["pixel_f1"] == pytest.approx(results[cls]["P-F1max"], rel=1e-12)
        assert saved["classes"][cls]["image_f1"] == pytest.approx(results[cls]["I-F1max"], rel=1e-12)
    assert saved["split"] == "test" and "selection on the test set" in saved["note"]
    assert (
        set(saved["classes"]) == {"a", "b"} and saved["overall"]["image"] == ev.thresholds["overall"]["image"]
    )
    assert 0 < saved["classes"]["b"]["pixel_f1"] < 1
    assert (run / "report.html").is_file() and len(list((run / "report_files").rglob("*.png"))) == 8
    saved["source"] = "calibrate"
    th.save(saved, run / "thresholds.json")
    ev.compute(out_dir=run)
    assert json.loads((run / "thresholds.json").read_text())["source"] == "calibrate"
    assert json.loads((run / "thresholds_test.json").read_text())["source"] == "evaluation"


def test_predict_labels_masks_unknown_class_and_overrides(
    run_dir: Path, photos: Path, calibrated: dict, tmp_path: Path
) -> None:
    t = calibrated["thresholds"]
    out = tmp_path / "out"
    assert predict_cli.main(["--checkpoint", str(run_dir), "--input", str(photos), "--output", str(out)]) == 0
    rows = _rows(out)
    bottle_t, bottle_p = t["classes"]["bottle"]["image"], t["classes"]["bottle"]["pixel"]
    labels = {name: rows[name]["label"] for name in rows}
    assert {labels["bottle/a.png"], labels["bottle/b.png"]} == {"normal", "anomalous"}
    for name in ("bottle/a.png", "bottle/b.png"):
        r = rows[name]
        assert r["thresholds_from"] == "class bottle" and float(r["image_threshold"]) == pytest.approx(
            bottle_t
        )
        assert (r["label"] == "anomalous") == (float(r["score"]) >= bottle_t)
        amap = np.load(out / r["map"])
        mask = np.asarray(Image.open(out / r["mask"])) > 0
        np.testing.assert_array_equal(mask, amap >= bottle_p)
        assert mask.any() and not mask.all()
    assert rows["screw/c.png"]["thresholds_from"] == "overall (class screw not calibrated)"
    assert rows["d.png"]["thresholds_from"] == "overall (no class given)"
    assert float(rows["screw/c.png"]["pixel_threshold"]) == pytest.approx(t["overall"]["pixel"])
    assert rows["screw/c.png"]["label"] == "normal"  # the overall image threshold lies above every score
    api = load_model(run_dir).predict(
        sorted(photos.rglob("*.png")), classes=["bottle", "bottle", None, "screw"]
    )
    assert api.sources[2] == "overall (no class given)" and api.labels.dtype == bool
    over = tmp_path / "over"
    args = ["--checkpoint", str(run_dir), "--input", str(photos), "--output", str(over)]
    assert predict_cli.main([*args, "--threshold", "-1", "--pixel-threshold", "1e9"]) == 0
    for r in _rows(over).values():
        assert r["label"] == "anomalous" and float(r["anomalous_pixels"]) == 0.0
        assert r["thresholds_from"].endswith("image given, pixel given")


def test_outputs_at_the_photo_size_and_maps_unchanged(
    run_dir: Path, photos: Path, calibrated: dict, tmp_path: Path
) -> None:
    out, small = tmp_path / "photo", tmp_path / "model"
    base = ["--checkpoint", str(run_dir), "--input", str(photos)]
    assert predict_cli.main([*base, "--output", str(out)]) == 0
    assert predict_cli.main([*base, "--output", str(small), "--size", "model"]) == 0
    for name, r in _rows(out).items():
        h, w = Image.open(photos / name).size[::-1]
        assert (int(r["height"]), int(r["width"])) == (h, w)
        amap = np.load(out / r["map"])
        assert amap.shape == (h, w)
        assert Image.open(out / r["overlay"]).size == (w, h) and Image.open(out / r["mask"]).size == (w, h)
        model_map = calibrated["maps"][name]
        np.testing.assert_array_equal(np.load(small / _rows(small)[name]["map"]), model_map)
        np.testing.assert_array_equal(amap, resize_map(model_map, (h, w)))
        assert float(r["score"]) == pytest.approx(calibrated["scores"][name], rel=1e-6)
        panel = Image.open(out / r["panel"])
        assert panel.height > min(h, 240)  # tiles, colour bar and caption
    legend = (out / "README.txt").read_text()
    assert "dark blue, normal" in legend and "each photo's own size" in legend
    report = (out / "report.html").read_text()
    assert report.count('class="card ') == 4 and "http://" not in report.replace("http://www.w3.org", "")


def test_an_interrupted_predict_continues_without_redoing_images(
    run_dir: Path, photos: Path, calibrated: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out"
    args = ["--checkpoint", str(run_dir), "--input", str(photos), "--output", str(out), "--batch-size", "1"]
    real = predict_cli._write_one
    done: list[str] = []

    def interrupted(*a, **k):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(a[2].as_posix())
        return real(*a, **k)

    monkeypatch.setattr(predict_cli, "_write_one", interrupted)
    assert predict_cli.main(args) == 130  # Ctrl-C: a message, no traceback
    assert "interrupted: 2 of 4 image(s) finished" in capsys.readouterr().out
    assert sorted(_rows(out)) == sorted(done)
    with open(out / "scores.csv", "a") as handle:
        handle.write("screw/c.png,screw,0.1")  # a row cut short by the interruption
    done.clear()

    def counting(*a, **k):
        done.append(a[2].as_posix())
        return real(*a, **k)

    monkeypatch.setattr(predict_cli, "_write_one", counting)
    assert predict_cli.main(args) == 0
    assert len(done) == 2 and "2 already done" in capsys.readouterr().out
    lines = (out / "scores.csv").read_text().splitlines()
    assert len(lines) == 5 and len({line.split(",")[0] for line in lines}) == 5
    for name, r in _rows(out).items():
        assert float(r["score"]) == pytest.approx(calibrated["scores"][name], rel=1e-6)
    assert predict_cli.main([*args, "--threshold", "0.5"]) == 2  # other settings: refused, not mixed
    assert "holds the predictions of a run with other threshold" in capsys.readouterr().err


def test_calibrate_on_a_labelled_folder(run_dir: Path, tmp_path: Path, calibrated: dict) -> None:
    root = tmp_path / "calib" / "bottle"
    for i in range(3):
        _photo(root / "good" / f"{i}.png", 40, 60, 10 + i)
        _photo(root / "crack" / f"{i}.png", 40, 60, 20 + i)
        mask = np.zeros((40, 60), np.uint8)
        mask[5:20, 10:30] = 255
        (root / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth" / "crack" / f"{i}_mask.png")
    target = tmp_path / "thresholds.json"
    argv = ["--checkpoint", str(run_dir), "--input", str(tmp_path / "calib"), "--output", str(target)]
    assert calibrate.main(argv) == 0
    saved = json.loads(target.read_text())
    assert saved["source"] == "calibrate" and "separate from the test split" in saved["note"]
    assert set(saved["classes"]) == {"bottle"} and saved["classes"]["bottle"]["anomalous_images"] == 3
    assert saved["overall"]["pixel"] is not None and saved["overall"]["image_f1"] > 0
