"""tools/prepare_data.py and data/prepare.py on tiny generated fixtures of every supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.meta import DataError
from data.prepare import PARSERS, validate_meta
from tools.prepare_data import main


def _img(path: Path, size: int = 12, mode: str = "RGB", value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((size, size), value * 200, np.uint16)).save(path)
    else:
        Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode)).save(path)
    return path


def _mvtec(root: Path, cls: str = "bottle", gt_suffix: str = "_mask") -> None:
    for i in range(2):
        _img(root / cls / "train" / "good" / f"{i:03d}.png")
    _img(root / cls / "test" / "good" / "000.png")
    _img(root / cls / "test" / "crack" / "000.png")
    _img(root / cls / "ground_truth" / "crack" / f"000{gt_suffix}.png", mode="L", value=255)


def _run(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "meta_out.json"
    rc = main([*args, "--out", str(out), "--no-progress"])
    return rc, json.loads(out.read_text()) if out.is_file() else {}


def test_mvtec_layout(tmp_path: Path) -> None:
    _mvtec(tmp_path / "d")
    rc, meta = _run(tmp_path, "--dataset", "mvtec", "--root", str(tmp_path / "d"))
    assert rc == 0
    assert len(meta["train"]["bottle"]) == 2
    anom = [it for it in meta["test"]["bottle"] if it["anomaly"]]
    assert anom[0]["mask_path"] == "bottle/ground_truth/crack/000_mask.png"


def test_btad_layout(tmp_path: Path) -> None:
    root = tmp_path / "btad"
    _img(root / "01" / "train" / "ok" / "0000.bmp")
    _img(root / "01" / "test" / "ok" / "0000.bmp")
    _img(root / "01" / "test" / "ko" / "0001.bmp")
    _img(root / "01" / "ground_truth" / "ko" / "0001.png", mode="L", value=255)
    rc, meta = _run(tmp_path, "--dataset", "btad", "--root", str(root))
    assert rc == 0
    test = meta["test"]["01"]
    assert [it["anomaly"] for it in test] == [1, 0]
    assert test[0]["mask_path"] == "01/ground_truth/ko/0001.png"
    assert test[1]["specie_name"] == "good"


def test_visa_layout(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i, (split, label) in enumerate([("train", "normal"), ("test", "normal"), ("test", "anomaly")]):
        kind = "Anomaly" if label == "anomaly" else "Normal"
        img = f"candle/Data/Images/{kind}/{i:03d}.JPG"
        _img(root / img)
        mask = ""
        if label == "anomaly":
            mask = f"candle/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / mask, mode="L", value=2)
        rows.append(f"candle,{split},{label},{img},{mask}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    rc, meta = _run(tmp_path, "--dataset", "visa", "--root", str(root))
    assert rc == 0
    assert len(meta["train"]["candle"]) == 1
    assert [it["anomaly"] for it in meta["test"]["candle"]] == [0, 1]
    assert meta["test"]["candle"][1]["mask_path"] == "candle/Data/Masks/Anomaly/002.png"


def test_realiad_views(tmp_path: Path) -> None:
    root = tmp_path / "realiad"
    train, test = [], []
    for view in ("C1", "C2", "C3"):
        ok = f"OK/S0001/audio_0001_OK_{view}_20230922.jpg"
        ng = f"NG/AK/S0002/audio_0002_NG_AK_{view}_20230922.jpg"
        _img(root / "audio" / ok)
        _img(root / "audio" / ng)
        _img(root / "audio" / ng.replace(".jpg", "_mask.png"), mode="L", value=255)
        train.append({"image_path": ok, "mask_path": None, "anomaly_class": "OK"})
        test.append({"image_path": ng, "mask_path": ng.replace(".jpg", "_mask.png"), "anomaly_class": "AK"})
    (root / "realiad_jsons").mkdir()
    (root / "realiad_jsons" / "audio.json").write_text(json.dumps({"train": train, "test": test}))
    rc, meta = _run(tmp_path, "--dataset", "realiad", "--root", str(root))
    assert rc == 0
    assert len(meta["train"]["audio"]) == 3
    it = meta["test"]["audio"][2]
    assert (it["view"], it["sample_id"], it["anomaly"], it["specie_name"]) == ("C3", "S0002", 1, "AK")
    assert it["mask_path"].startswith("audio/NG/AK/S0002/") and it["mask_path"].endswith("_mask.png")
    rc, meta = _run(tmp_path, "--dataset", "realiad", "--root", str(root), "--views", "C1,C3")
    assert rc == 0
    assert [x["view"] for x in meta["test"]["audio"]] == ["C1", "C3"]


def test_mvtec3d_layout(tmp_path: Path) -> None:
    root = tmp_path / "m3d"
    _img(root / "bagel" / "train" / "good" / "rgb" / "000.png")
    _img(root / "bagel" / "validation" / "good" / "rgb" / "000.png")
    _img(root / "bagel" / "test" / "good" / "rgb" / "000.png")
    _img(root / "bagel" / "test" / "crack" / "rgb" / "000.png")
    _img(root / "bagel" / "test" / "crack" / "gt" / "000.png", mode="L", value=255)
    rc, meta = _run(tmp_path, "--dataset", "mvtec3d", "--root", str(root))
    assert rc == 0
    assert len(meta["train"]["bagel"]) == 2
    assert meta["test"]["bagel"][0]["mask_path"] == "bagel/test/crack/gt/000.png"


def test_folder_single_class_modes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "tiles"
    _img(root / "train" / "good" / "a.png", mode="L")
    _img(root / "train" / "good" / "b.png", mode="RGBA")
    _img(root / "train" / "good" / "c.tif", mode="I;16")
    (root / "train" / "good" / "notes.txt").write_text("x")
    _img(root / "test" / "good" / "a.jpg", size=16)
    _img(root / "test" / "hole" / "d.png", size=16)
    _img(root / "ground_truth" / "hole" / "d.png", size=16, mode="L", value=255)
    rc, meta = _run(tmp_path, "--dataset", "folder", "--root", str(root))
    assert rc == 0
    assert "ignored non-image file" in capsys.readouterr().out
    assert len(meta["train"]["tiles"]) == 3
    assert meta["test"]["tiles"][1]["mask_path"] == "ground_truth/hole/d.png"


def test_folder_multi_class(tmp_path: Path) -> None:
    _mvtec(tmp_path / "d", "a")
    _mvtec(tmp_path / "d", "b", gt_suffix="")
    meta, _ = PARSERS["folder"](tmp_path / "d")
    assert sorted(meta["train"]) == ["a", "b"]
    assert meta["test"]["b"][0]["mask_path"] == "b/ground_truth/crack/000.png"


def test_bad_inputs_are_all_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "bad"
    _mvtec(root, "a")
    trunc = root / "a" / "train" / "good" / "000.png"
    trunc.write_bytes(trunc.read_bytes()[:30])
    _img(root / "a" / "test" / "hole" / "001.png")
    _img(root / "a" / "test" / "scratch" / "002.png")
    _img(root / "a" / "ground_truth" / "scratch" / "002_mask.png", size=8, mode="L")
    (root / "empty" / "train" / "good").mkdir(parents=True)
    rc, _ = _run(tmp_path, "--dataset", "folder", "--root", str(root))
    err = capsys.readouterr().err
    assert rc == 1
    assert "000.png cannot be decoded" in err
    assert "001.png has no mask" in err
    assert "is 8x8 but image" in err
    assert "class 'empty' has no training images" in err


def test_missing_mask_mvtec_and_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _mvtec(tmp_path / "d")
    assert _run(tmp_path, "--dataset", "mvtec", "--root", str(tmp_path / "d"))[0] == 0
    (tmp_path / "d" / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    rc, _ = _run(tmp_path, "--dataset", "mvtec", "--root", str(tmp_path / "d"), "--check")
    assert rc == 1
    assert "000_mask.png does not exist" in capsys.readouterr().err
    with pytest.raises(DataError, match="no mask"):
        PARSERS["mvtec"](tmp_path / "d")


@pytest.mark.parametrize("dataset", sorted(PARSERS))
def test_wrong_root_names_layout(tmp_path: Path, dataset: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["--dataset", dataset, "--root", str(tmp_path / "empty"), "--no-progress"])
    assert rc == 1
    assert f"--dataset {dataset} expects" in capsys.readouterr().err
    assert validate_meta(tmp_path, {"train": {}, "test": {}}, progress=False) == []
