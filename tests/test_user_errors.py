"""User errors of the entry points the README names are one paragraph: folders that cannot be
written, full disks, damaged exported models; progress in a redirected log stays short."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

import run
from data.meta import read_json
from data.prepare import validate_meta
from data.synthetic import generate_demo_dataset
from deploy import runtime
from model.build import build_model
from tools import prepare_data
from util.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/mambaad_demo.py")
SMALL = [
    "model.depths=[2,2,2,2]",
    "model.teacher.name=resnet18",
    "data.image_size=64",
    "model.scan.directions=2",
]


def test_an_output_dir_that_cannot_be_created_stops_training_in_one_paragraph(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the runs folder would go")
    argv = ["-c", CONFIG, f"data.root={tiny_data}", "data.synthetic=False", f"output_dir={blocker / 'runs'}"]
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert f"output_dir={blocker / 'runs'} cannot be written: Not a directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_damaged_exported_model_is_one_line_from_the_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"these bytes are no ONNX protobuf")
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert runtime.main([str(model), str(image)]) == 1
    err = capsys.readouterr().err
    assert f"{model} cannot be loaded by onnxruntime" in err and "export it again" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert runtime.main([str(tmp_path / "missing.onnx"), str(image)]) == 1
    assert "missing.onnx does not exist" in capsys.readouterr().err
    with pytest.raises(runtime.ModelFileError):  # the API raises it, a ValueError
        runtime.load_exported(model)


def test_prepare_on_a_full_disk_keeps_the_old_meta_and_no_temporary_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    generate_demo_dataset(root, image_size=32, n_train=2, n_test_good=1, n_test_bad=1, seed=0)
    before = (root / "meta.json").read_bytes()
    tmp = root / f".meta.json.{os.getpid()}.tmp"  # the temporary file write_meta uses
    tmp.symlink_to("/dev/full")
    assert prepare_data.main(["--dataset", "mvtec", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {root / 'meta.json'}" in err and "not changed" in err
    assert "Traceback" not in err
    assert not os.path.lexists(tmp) and (root / "meta.json").read_bytes() == before


def test_prepare_progress_is_a_line_in_a_redirected_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    generate_demo_dataset(root, image_size=32, n_train=20, n_test_good=5, n_test_bad=5, seed=0)
    assert validate_meta(root, read_json(root / "meta.json", ""), progress=True) == []
    err = capsys.readouterr().err  # captured: not a terminal, as under nohup or Slurm
    lines = [line for line in err.splitlines() if line.startswith("checking images")]
    assert len(lines) == 1 and re.fullmatch(r"checking images: 90/90 in \d+ s", lines[0]) and "\r" not in err


def test_a_data_root_that_cannot_be_created_is_one_paragraph(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match=r"data\.root=.*cannot be written") as info:
        generate_demo_dataset(blocker / "demo", image_size=32, n_train=2, n_test_good=1, n_test_bad=1)
    assert type(info.value).__name__ == "UnwritableError"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.teacher.checkpoint={missing}", "model.teacher.checkpoint={missing} names no file"),
        ("model.checkpoint={missing}", "{missing}"),
    ],
)
def test_a_missing_checkpoint_is_one_paragraph(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    missing = tmp_path / "none.pth"
    mode = ["-m", "test"] if override.startswith("model.checkpoint") else []
    argv = ["-c", CONFIG, *mode, f"data.root={tiny_data}", "data.synthetic=False", f"output_dir={tmp_path}"]
    assert run.main([*argv, override.format(missing=missing)]) != 0
    err = capsys.readouterr().err
    assert expected.format(missing=missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_collect_names_a_run_without_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools import collect

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    names = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
    results = {"mean": {m: 0.5 for m in names}}
    (run_dir / "metrics.json").write_text(json.dumps({"final": {"epoch": 1, "results": results}}))
    assert collect.main([str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.json'} is missing" in err and "Traceback" not in err


def test_visualize_errors_after_loading_are_one_paragraph(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools import visualize

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(CONFIG, [f"data.root={tmp_path / 'moved'}", "data.synthetic=False", *SMALL])
    save_config(cfg, run_dir / "config.json")
    torch.save(build_model(cfg, logging.getLogger("test")).state_dict(), run_dir / "net.pth")
    assert visualize.main([str(run_dir), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert f"data root {tmp_path / 'moved'} does not exist" in err and "Traceback" not in err
