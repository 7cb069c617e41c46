"""tools/prepare_data.py and data/prepare.py on tiny generated fixtures of every supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.prepare import PARSERS, validate_meta
from tools.prepare_data import main


def _img(path: Path, size: int = 12, mode: str = "RGB", value: int = 100) -> Path:
    """A flat image; ``size=0`` means 10 x 8 (the COCO fixture's annotated size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if size == 0:
        Image.new(mode, (10, 8), (value,) * 3).save(path)
    elif mode == "I;16":
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
    assert (it["view"], it["sample_id"], it["anomaly"], it["specie_name"]) == (
        "C3",
        "audio/NG/AK/S0002",
        1,
        "AK",
    )
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


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _noise_png(path: Path, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("dataset", ["mvtec", "mpdd", "folder"])
def test_bad_inputs_are_all_reported(tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str) -> None:
    root = tmp_path / "bad"
    _mvtec(root, "a")
    header_only = root / "a" / "train" / "good" / "000.png"
    header_only.write_bytes(header_only.read_bytes()[:30])
    _truncate(_noise_png(root / "a" / "train" / "good" / "002.png"))
    (root / "a" / "train" / "good" / "003.png").write_text("a text file named like an image")
    (root / "a" / "train" / "good" / "Thumbs.db").write_bytes(b"\0\1")
    _img(root / "a" / "test" / "hole" / "001.png")
    _img(root / "a" / "test" / "scratch" / "002.png")
    _img(root / "a" / "ground_truth" / "scratch" / "002_mask.png", size=8, mode="L")
    (root / "empty" / "train" / "good").mkdir(parents=True)
    rc, meta = _run(tmp_path, "--dataset", dataset, "--root", str(root))
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 1
    assert "ignored non-image file" in captured.out and "Thumbs.db" in captured.out
    assert len(meta["train"]["a"]) == 4, "the meta is written even when problems are found"
    assert "000.png cannot be decoded" in err
    assert "002.png cannot be decoded" in err and "truncated" in err
    assert "003.png cannot be decoded" in err
    assert "001.png has no mask; add it to the ground-truth folder" in err
    assert "002_mask.png is 8x8 but image" in err and "resize or replace the mask" in err
    assert "class 'empty' has no training images" in err
    assert "class 'empty' has no test images" in err  # no result could be reported for it
    assert "7 problem(s) found" in err


def _btad(root: Path) -> Path:
    _img(root / "01" / "train" / "ok" / "0000.bmp")
    _img(root / "01" / "test" / "ok" / "0000.bmp")
    for name in ("0001", "0002"):
        _img(root / "01" / "test" / "ko" / f"{name}.bmp")
    _img(root / "01" / "ground_truth" / "ko" / "0002.png", size=6, mode="L", value=255)
    return root


def _mvtec3d(root: Path) -> Path:
    _img(root / "bagel" / "train" / "good" / "rgb" / "000.png")
    _truncate(_noise_png(root / "bagel" / "validation" / "good" / "rgb" / "000.png"))
    for name in ("000", "001"):
        _img(root / "bagel" / "test" / "crack" / "rgb" / f"{name}.png")
    _img(root / "bagel" / "test" / "crack" / "gt" / "001.png", size=6, mode="L", value=255)
    return root


@pytest.mark.parametrize(("dataset", "build"), [("btad", _btad), ("mvtec3d", _mvtec3d)])
def test_missing_and_mismatched_masks_other_layouts(
    tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str, build
) -> None:
    root = build(tmp_path / dataset)
    rc, _ = _run(tmp_path, "--dataset", dataset, "--root", str(root))
    err = capsys.readouterr().err
    assert rc == 1
    assert "has no mask" in err and "is 6x6 but image" in err
    assert ("cannot be decoded" in err) == (dataset == "mvtec3d")


def test_missing_mask_mvtec_and_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _mvtec(tmp_path / "d")
    assert _run(tmp_path, "--dataset", "mvtec", "--root", str(tmp_path / "d"))[0] == 0
    mask = tmp_path / "d" / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    mask.unlink()
    rc, _ = _run(tmp_path, "--dataset", "mvtec", "--root", str(tmp_path / "d"), "--check")
    assert rc == 1
    assert "000_mask.png does not exist" in capsys.readouterr().err
    meta, _ = PARSERS["mvtec"](tmp_path / "d")
    assert [it["mask_path"] for it in meta["test"]["bottle"] if it["anomaly"]] == [""]
    assert "has no mask" in validate_meta(tmp_path / "d", meta, progress=False)[0]

    out = tmp_path / "meta_out.json"
    meta["test"]["bottle"][0].pop("anomaly")
    out.write_text(json.dumps(meta))
    assert main(["--dataset", "mvtec", "--root", str(tmp_path / "d"), "--out", str(out), "--check"]) == 1
    assert "['test']['bottle'][0] lacks anomaly; rebuild the meta file" in capsys.readouterr().err
    out.write_text("{")
    assert main(["--dataset", "mvtec", "--root", str(tmp_path / "d"), "--out", str(out), "--check"]) == 1
    assert "is not valid JSON" in capsys.readouterr().err


def test_visa_and_realiad_problems_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask", "candle,train,normal,candle/n.JPG,"]
    rows += ["candle,test,anomaly,candle/a.JPG,candle/gone.png", "candle,test,anomaly,candle/b.JPG,"]
    for name in ("n", "a", "b"):
        _img(root / "candle" / f"{name}.JPG")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert _run(tmp_path, "--dataset", "visa", "--root", str(root))[0] == 1
    err = capsys.readouterr().err
    assert "gone.png does not exist" in err and "b.JPG has no mask" in err and "2 problem(s)" in err

    root = tmp_path / "realiad"
    rec = {"image_path": "OK/S0001/x_C1_1.jpg", "mask_path": None, "anomaly_class": "OK"}
    (root / "audio.json").parent.mkdir(parents=True)
    (root / "audio.json").write_text(json.dumps({"train": [rec], "test": [rec]}))
    assert _run(tmp_path, "--dataset", "realiad", "--root", str(root))[0] == 1
    assert "x_C1_1.jpg does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", sorted(PARSERS))
def test_wrong_root_names_layout(tmp_path: Path, dataset: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["--dataset", dataset, "--root", str(tmp_path / "empty"), "--no-progress"])
    assert rc == 1
    assert f"--dataset {dataset} expects" in capsys.readouterr().err
    assert validate_meta(tmp_path, {"train": {}, "test": {}}, progress=False) == []


# --- COCO-AD ------------------------------------------------------------------------------------

# real COCO category ids: 1..90 without these ten, so that the 80 are not contiguous
_COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE encoding (the inverse of the decoder under test)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _coco(root: Path) -> None:
    """train2017: normal / anomalous (split 0) / unannotated; val2017: normal, polygon, RLE, string RLE."""
    cats = [{"id": i, "name": f"c{i}"} for i in _COCO_IDS]
    first, last, second_group = _COCO_IDS[0], _COCO_IDS[-1], _COCO_IDS[25]
    w, h = 10, 8
    rle = np.zeros((h, w), bool)
    rle[1:3, 6:9] = True
    flat = rle.T.ravel()  # column-major runs, zeros first
    runs = [len(list(g)) for _, g in __import__("itertools").groupby(flat)]
    runs = runs if not flat[0] else [0, *runs]
    sets = {
        "train": [
            ("t_normal", [last]),
            ("t_anom", [last, first]),
            ("t_mid", [_COCO_IDS[45]]),
            ("t_empty", []),
        ],
        "val": [
            ("v_normal", [last]),
            ("v_poly", [first, last]),
            ("v_rle", [_COCO_IDS[5]]),
            ("v_str", [_COCO_IDS[7]]),
            ("v_split1", [second_group]),
        ],
    }
    for split, images in sets.items():
        recs, anns = [], []
        for n, (name, cat_ids) in enumerate(images):
            _img(root / f"{split}2017" / f"{name}.jpg", size=0)
            recs.append({"id": n + 1, "file_name": f"{name}.jpg", "height": h, "width": w})
            for cat in cat_ids:
                seg: object = [[2, 2, 5, 2, 5, 4, 2, 4]]
                if name == "v_rle":
                    seg = {"counts": runs, "size": [h, w]}
                elif name == "v_str":
                    seg = {"counts": _rle_string(runs), "size": [h, w]}
                anns.append({"id": len(anns) + 1, "image_id": n + 1, "category_id": cat, "segmentation": seg})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        data = {"images": recs, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def test_coco_splits_meta_and_masks(tmp_path: Path) -> None:
    from data.coco import decode_rle

    root = tmp_path / "coco"
    _coco(root)
    rc = main(["--dataset", "coco", "--root", str(root), "--no-progress"])
    assert rc == 0
    metas = {s: json.loads((root / f"meta_20_{s}.json").read_text()) for s in range(4)}
    m0 = metas[0]
    assert [it["img_path"] for it in m0["train"]["coco"]] == ["train2017/t_mid.jpg", "train2017/t_normal.jpg"]
    test = {Path(it["img_path"]).stem: it for it in m0["test"]["coco"]}
    assert {k: v["anomaly"] for k, v in test.items()} == {
        "v_normal": 0,
        "v_poly": 1,
        "v_rle": 1,
        "v_str": 1,
        "v_split1": 0,
    }
    assert test["v_poly"]["mask_path"] == "val2017_mask_ad_20_0/v_poly.png"
    assert test["v_normal"]["mask_path"] == "" and test["v_normal"]["specie_name"] == "good"
    poly = np.asarray(Image.open(root / test["v_poly"]["mask_path"])) > 0
    expected = np.zeros((8, 10), bool)
    expected[2:5, 2:6] = True
    assert np.array_equal(poly, expected)
    rle = np.asarray(Image.open(root / test["v_rle"]["mask_path"])) > 0
    assert rle.sum() == 6 and rle[1:3, 6:9].all()
    assert np.array_equal(np.asarray(Image.open(root / test["v_str"]["mask_path"])) > 0, rle)
    # split 1: group 1 (labels 20..39) anomalous, so t_anom trains and only v_split1 is anomalous
    m1 = metas[1]
    assert len(m1["train"]["coco"]) == 3 and len(metas[2]["train"]["coco"]) == 2
    assert [Path(it["img_path"]).stem for it in m1["test"]["coco"] if it["anomaly"]] == ["v_split1"]
    assert (root / "val2017_mask_ad_20_1" / "v_split1.png").is_file()
    assert decode_rle([2, 3, 1], 2, 3).T.ravel().tolist() == [0, 0, 1, 1, 1, 0]

    assert main(["--dataset", "coco", "--root", str(root), "--split", "2", "--check", "--no-progress"]) == 0
    from data.default_ad import DefaultAD

    items = DefaultAD(root, "test", image_size=8, meta_file="meta_20_0.json", log=print)
    assert [int(items[i]["img_mask"].sum() > 0) for i in range(len(items))] == [0, 1, 1, 0, 1]
    with pytest.raises(SystemExit):
        main(["--dataset", "coco", "--root", str(root), "--split", "4"])


def test_coco_bad_annotations(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "coco"
    _coco(root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"] = {"counts": [1, 2], "size": [8, 10]}
    path.write_text(json.dumps(data))
    assert main(["--dataset", "coco", "--root", str(root), "--split", "0", "--no-progress"]) == 1
    assert "unreadable segmentation (RLE covers 3 pixels, image has 80)" in capsys.readouterr().err
    train_path = root / "annotations" / "instances_train2017.json"
    train = json.loads(train_path.read_text())
    train_path.write_text(json.dumps({**train, "categories": train["categories"][:79]}))
    assert main(["--dataset", "coco", "--root", str(root), "--split", "0", "--no-progress"]) == 1
    assert "needs the 80 COCO categories, found 79" in capsys.readouterr().err


def test_check_refuses_what_training_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # --check and training read the same rules (data.meta.content_problems): a misfiled item, an
    # anomalous training image and a class without test images, each named with its fix
    from data.meta import DataError, load_meta

    root = tmp_path / "data"
    _mvtec(root, "a")
    _mvtec(root, "b")
    rc, meta = _run(tmp_path, "--dataset", "mvtec", "--root", str(root))
    assert rc == 0
    meta["test"]["b"].append(meta["test"]["a"][0])  # cls_name 'a' under class 'b'
    meta["train"]["a"].append(next(it for it in meta["test"]["a"] if it["anomaly"]))
    for path in (tmp_path / "meta_out.json", root / "meta.json"):  # what --check and training read
        path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert _run(tmp_path, "--dataset", "mvtec", "--root", str(root), "--check")[0] == 1
    err = capsys.readouterr().err
    assert "has cls_name 'a' but is listed under class 'b'" in err
    assert "is anomalous, but training images must be normal" in err and "2 problem(s) found" in err
    with pytest.raises(DataError, match=r"training images must be normal.*\(1 more: tools/prepare_data"):
        load_meta(root)
