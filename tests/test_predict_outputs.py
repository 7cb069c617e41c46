"""tools/predict.py writes one map and one overlay per input image and says which row is which."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.build import build_model
from util.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import predict  # noqa: E402

SMALL = [
    "model.depths=[2,2,2,2]",
    "model.teacher.name=resnet18",
    "data.image_size=64",
    "model.scan.directions=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved as a run folder (config.json + net.pth)."""
    run = tmp_path_factory.mktemp("predict_run")
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/mambaad_demo.py", SMALL)
    save_config(cfg, run / "config.json")
    torch.save(build_model(cfg, logging.getLogger("test_predict")).state_dict(), run / "net.pth")
    return run


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)


def test_every_input_gets_its_own_files_and_csv_row(run_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    names = ["a.png", "a.jpg", "b.png", "sub/a.png", "sub/c.bmp"]
    for i, name in enumerate(names):
        _image(inputs / name, i)
    out = tmp_path / "out"
    args = ["--checkpoint", str(run_dir), "--input", str(inputs), "--output", str(out), "--size", "model"]
    assert predict.main(args) == 0
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert sorted(r["image"] for r in rows) == sorted(names)
    by_image = {r["image"]: r for r in rows}
    assert by_image["a.png"]["map"] == "a.png.npy" and by_image["a.jpg"]["map"] == "a.jpg.npy"
    assert by_image["b.png"]["map"] == "b.npy" and by_image["b.png"]["overlay"] == "b.png"
    assert by_image["sub/a.png"]["map"] == "sub/a.npy" and by_image["sub/c.bmp"]["overlay"] == "sub/c.png"
    maps = {r[k] for r in rows for k in ("map", "overlay", "mask", "panel")}
    assert len(maps) == 4 * len(names)
    for row in rows:
        amap = np.load(out / row["map"])
        assert amap.shape == (64, 64) and amap.dtype == np.float32
        assert float(row["score"]) == pytest.approx(float(amap.max()), rel=1e-5)
        assert (out / row["overlay"]).is_file()
    assert float(by_image["a.png"]["score"]) != float(by_image["a.jpg"]["score"])  # two maps, not one
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # nothing overwritten: a map, an overlay, a mask and a panel each, + scores.csv, predict.json,
    # README.txt, report.html
    assert len(written) == 4 * len(names) + 4


def test_output_names_stay_distinct_in_corner_cases() -> None:
    rel = [Path(n) for n in ["a.png", "a.jpg", "a.png.jpg", "A.PNG.tif", "x/y.png", "x__y.png"]]
    bases = predict.output_names(rel)
    assert len({b.as_posix().lower() for b in bases}) == len(rel)
    assert bases[4] == Path("x/y") and bases[5] == Path("x__y")
    assert predict.with_extension(Path("a.png"), ".npy") == Path("a.png.npy")


def test_output_that_is_a_file_or_would_overwrite_inputs_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    _image(inputs / "a.png", 0)
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    args = ["--checkpoint", str(run_dir), "--input", str(inputs), "--output"]
    assert predict.main([*args, str(target)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"
    before = (inputs / "a.png").read_bytes()
    assert predict.main([*args, str(inputs)]) == 2  # the overlay a.png would replace the input a.png
    assert "would overwrite the input image" in capsys.readouterr().err
    assert (inputs / "a.png").read_bytes() == before
    (inputs / "broken.png").write_bytes(before[:40])  # truncated: a clean error naming the file
    assert predict.main([*args, str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: cannot read image file {inputs}")


def test_an_output_folder_inside_the_input_folder_is_no_input(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "photos"
    _image(inputs / "a.png", 0)
    _image(inputs / "b.png", 1)
    args = ["--checkpoint", str(run_dir), "--input", str(inputs), "--output", str(inputs / "pred")]
    assert predict.main(args) == 0
    assert predict.main(args) == 0  # again: its own overlays pred/a.png, pred/b.png are not scored
    rows = list(csv.DictReader((inputs / "pred" / "scores.csv").read_text().splitlines()))
    assert sorted(r["image"] for r in rows) == ["a.png", "b.png"]
    assert not (inputs / "pred" / "pred").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vmin", "2", "--vmax", "1"], "--vmin 2 must be below --vmax 1"),
        (["--vmin", "1", "--vmax", "1"], "--vmin 1 must be below --vmax 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ],
)
def test_bad_options_are_one_paragraph(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    _image(tmp_path / "in" / "a.png", 0)
    args = ["--checkpoint", str(run_dir), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    assert predict.main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_api_refuses_what_it_cannot_score_and_keeps_8_bit_values(run_dir: Path) -> None:
    from mambaad import load_model, prepare_image
    from mambaad import predict as api_predict

    model = load_model(run_dir)
    with pytest.raises(ValueError, match="batch_size must be a positive whole number"):
        api_predict(model, [np.zeros((8, 8, 3), np.uint8)], batch_size=0)
    with pytest.raises(TypeError, match="takes an image or a list of images"):
        api_predict(model, 5)
    with pytest.raises(ValueError, match=r"empty image \(0x0 pixels\)"):
        api_predict(model, np.zeros((0, 0, 3), np.uint8))
    gray = np.arange(64, dtype=np.int32).reshape(8, 8) * 4  # 8-bit values held in 32-bit mode "I"
    as_i = Image.fromarray(gray)
    assert as_i.mode == "I"
    as_l = Image.fromarray(gray.astype(np.uint8))
    assert torch.equal(prepare_image(as_i, (8, 8)), prepare_image(as_l, (8, 8)))  # was 257x darker


def test_a_full_disk_is_one_paragraph_naming_the_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    _image(inputs / "a.png", 0)
    out.mkdir()
    (out / "a.png").symlink_to("/dev/full")  # every write to the overlay fails with ENOSPC
    argv = ["--checkpoint", str(run_dir), "--input", str(inputs), "--output", str(out)]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing {out / 'a.png'}" in err and "Traceback" not in err
    assert (out / "a.npy").is_file() and (out / "scores.csv").is_file()  # written before it: kept
    assert len((out / "scores.csv").read_text().splitlines()) == 1  # no row: the image is done again


def test_an_output_folder_that_cannot_be_created_is_one_paragraph(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    _image(inputs / "a.png", 0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["--checkpoint", str(run_dir), "--input", str(inputs), "--output", str(blocker / "out")]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert f"--output={blocker / 'out'} cannot be written" in err and "Traceback" not in err


def test_an_unreadable_image_is_named_with_a_fix_for_images_not_meta_json(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    _image(inputs / "a.png", 0)
    (inputs / "b.png").write_bytes(b"not an image")
    argv = ["--checkpoint", str(run_dir), "--input", str(inputs), "--output", str(tmp_path / "out")]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot read image file {inputs / 'b.png'}" in err
    assert "leave it out of the images to score" in err
    assert "meta.json" not in err and "Traceback" not in err


def test_a_checkpoint_of_another_architecture_is_one_paragraph(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    _image(inputs / "a.png", 0)
    argv = ["--checkpoint", str(run_dir / "net.pth"), "--input", str(inputs), "--output", str(tmp_path / "o")]
    assert predict.main([*argv, "model.depths=[3,4,6,3]"]) != 0  # the run's model has depths [2,2,2,2]
    err = capsys.readouterr().err
    assert "does not match the configured model" in err and "model.depths" in err and "Traceback" not in err
