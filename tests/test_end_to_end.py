"""Tiny real runs of run.py and tools/predict.py on generated data (train, resume, test, predict)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from util.checkpoint import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import predict  # noqa: E402

pytestmark = pytest.mark.slow


def _overrides(data_root: Path, out: Path, epochs: int) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.synthetic=False",
        "data.image_size=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.teacher.name=resnet18",
        "model.depths=[2,2,2,2]",
        "model.scan.directions=4",
        f"trainer.epochs={epochs}",
        "trainer.test_every=2",
        "trainer.log_every=1",
        f"output_dir={out}",
        "device=cpu",
    ]


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_train_resume_test_and_predict(tiny_data: Path, tmp_path: Path) -> None:
    config = str(REPO / "configs/mambaad_demo.py")
    # uninterrupted 3-epoch run
    full_out = tmp_path / "full"
    assert run.main(["-c", config, *_overrides(tiny_data, full_out, 3)]) == 0
    full = _only_run(full_out)
    for name in ("config.json", "ckpt.pth", "net.pth", "metrics.json", "metrics.csv", "log.txt"):
        assert (full / name).is_file(), name
    assert list((full / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    metrics = json.loads((full / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [2, 3]
    final = metrics["final"]["results"]
    assert set(final) == {"washer", "weave", "mean"}
    assert set(final["mean"]) >= {"I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD"}
    rows = list(csv.DictReader((full / "metrics.csv").read_text().splitlines()))
    assert {r["class"] for r in rows} == {"washer", "weave", "mean"}
    assert {r["epoch"] for r in rows} == {"2", "3"}
    seven = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
    for row in rows:
        values = [float(row[m]) for m in seven]
        assert float(row["mAD"]) == pytest.approx(np.nanmean(values), abs=1e-5)
    assert "results (epoch 3" in (full / "log.txt").read_text()

    # 2 epochs, then resume to 3: same weights and metrics as the uninterrupted run
    part_out = tmp_path / "part"
    assert run.main(["-c", config, *_overrides(tiny_data, part_out, 2)]) == 0
    part = _only_run(part_out)
    assert load_file(part / "ckpt.pth")["epoch"] == 2
    again = [*_overrides(tiny_data, part_out, 3), f"trainer.resume={part}"]
    assert run.main(["-c", config, *again]) == 2  # more epochs: only with trainer.resume_changes=True
    assert run.main(["-c", config, *again, "trainer.resume_changes=True"]) == 0
    assert _only_run(part_out) == part
    a, b = load_file(full / "net.pth"), load_file(part / "net.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    resumed = json.loads((part / "metrics.json").read_text())["final"]["results"]
    assert resumed["mean"] == pytest.approx(final["mean"], abs=1e-6)

    # -m test on the saved weights reproduces the final evaluation
    test_out = tmp_path / "test"
    args = [
        "-c",
        config,
        "-m",
        "test",
        *_overrides(tiny_data, test_out, 3),
        f"model.checkpoint={full / 'net.pth'}",
    ]
    assert run.main(args) == 0
    tested_final = json.loads((_only_run(test_out) / "metrics.json").read_text())["final"]
    tested = tested_final["results"]
    assert tested["mean"] == pytest.approx(final["mean"], abs=1e-6)
    assert tested_final["weights_epoch"] == 3  # how long the scored net.pth trained (its ckpt.pth)

    # -m test in the MambaAD paper's protocol: its table is reported, labelled, with the exact one
    # of the same maps beside it (equal to the exact -m test above: same weights, float16 maps)
    proto_out = tmp_path / "proto"
    proto_args = [*args[:4], *_overrides(tiny_data, proto_out, 3), args[-1], "evaluator.mode=mambaad"]
    assert run.main(proto_args) == 0
    proto = json.loads((_only_run(proto_out) / "metrics.json").read_text())["final"]
    assert proto["protocol"] == "mambaad" and proto["exact"]["protocol"] == "exact"
    assert proto["exact"]["results"]["mean"] == pytest.approx(tested["mean"], abs=1e-6)
    assert tested_final["protocol"] == "exact" and "exact" not in tested_final
    log = (_only_run(proto_out) / "log.txt").read_text()
    assert "protocol mambaad; values x100" in log and "the same maps under protocol exact" in log

    # predict: one .npy (at the model's input size with --size model) + overlay per image, scores = map maxima
    images = sorted((tiny_data / "weave" / "test").rglob("*.png"))[:3]
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for img in images:
        (in_dir / f"{img.parent.name}_{img.name}").write_bytes(img.read_bytes())
    pred_out = tmp_path / "pred"
    pred_args = [
        "-c",
        config,
        "--checkpoint",
        str(full / "net.pth"),
        "--input",
        str(in_dir),
        "--output",
        str(pred_out),
        "--size",
        "model",
    ]
    assert predict.main([*pred_args, *_overrides(tiny_data, tmp_path / "unused", 3)]) == 0
    scores = {
        Path(r["image"]).stem: float(r["score"])
        for r in csv.DictReader((pred_out / "scores.csv").read_text().splitlines())
    }
    assert len(scores) == 3
    for stem, score in scores.items():
        amap = np.load(pred_out / f"{stem}.npy")
        assert amap.shape == (64, 64) and amap.dtype == np.float32
        assert score == pytest.approx(float(amap.max()), rel=1e-5)
        assert (pred_out / f"{stem}.png").is_file()


def test_cli_errors_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs/mambaad_demo.py")
    assert run.main(["-c", config, "trainer.epochz=1"]) == 2
    assert "trainer.epochs" in capsys.readouterr().err
    assert run.main(["-c", config, "-m", "test"]) == 2
    assert "model.checkpoint" in capsys.readouterr().err
