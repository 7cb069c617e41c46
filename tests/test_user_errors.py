"""User errors of the entry points the README names are one paragraph: folders that cannot be
written, full disks, damaged exported models; progress in a redirected log stays short."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import run
from data.meta import read_json
from data.prepare import validate_meta
from data.synthetic import generate_demo_dataset
from deploy import runtime
from tools import prepare_data

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/mambaad_demo.py")


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
