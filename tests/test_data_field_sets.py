"""MVTec AD 2, MVTec LOCO AD, MAD-Sim and MAD-Real: generated trees with the real folder and file
names, prepared by tools/prepare_data.py and read through the real loaders, scoring and evaluator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs.base import ADDefaults
from data.default_ad import IMAGENET_MEAN, IMAGENET_STD, DefaultAD
from data.loaders import build_loaders
from data.meta import DataError
from data.prepare import LOCO_MERGED, merge_mask_folder
from evaluation.evaluator import ADEvaluator
from evaluation.metrics_extra import seg_f1
from evaluation.report import format_table
from evaluation.scoring import score_test_set
from tools import prepare_data
from util.distributed import DistContext

W, H = 20, 12  # not square, so that a width/height swap would show
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, box: tuple[int, int, int, int], value: int = 255) -> Path:
    """A mask with ``value`` in rows y0:y1, columns x0:x1 (``box`` = x0, y0, x1, y1)."""
    arr = np.zeros((H, W), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _mvtec2(root: Path) -> Path:
    """Two MVTec AD 2 classes: train and validation normal, test_public good/bad with masks, and
    the private test sets (no ground truth)."""
    for cls in ("can", "rice"):
        c = root / cls
        for i in range(3):
            _png(c / "train" / "good" / f"{i:03d}_regular.png")
        for i in range(2):
            _png(c / "validation" / "good" / f"{i:03d}_regular.png")
        _png(c / "test_public" / "good" / "000_regular.png")
        for i, name in enumerate(("000_regular", "001_overexposed")):
            _png(c / "test_public" / "bad" / f"{name}.png", 200)
            _mask(c / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png", (i, 0, i + 4, 3))
        _png(c / "test_private" / "000_regular.png")
        _png(c / "test_private_mixed" / "000_mixed.png")
    return root


def _loco(root: Path) -> Path:
    """Two MVTec LOCO AD classes. Normal images are grey 100, logical anomalies 200, structural
    ones 20; each anomaly has a mask folder, one of them two PNGs with two defect ids."""
    for cls in ("breakfast_box", "pushpins"):
        c = root / cls
        for i in range(3):
            _png(c / "train" / "good" / f"{i:03d}.png")
        _png(c / "validation" / "good" / "000.png")
        for i in range(2):
            _png(c / "test" / "good" / f"{i:03d}.png")
        for defect, value in (("logical_anomalies", 200), ("structural_anomalies", 20)):
            for i in range(2):
                _png(c / "test" / defect / f"{i:03d}.png", value)
                _mask(c / "ground_truth" / defect / f"{i:03d}" / "000.png", (0, 0, 3, 2), 255)
        _mask(c / "ground_truth" / "logical_anomalies" / "001" / "001.png", (10, 5, 14, 9), 254)
    return root


def _mad(root: Path, classes: tuple[str, str], mask_suffix: str) -> Path:
    """Two MAD classes: train/good, test/{good,Burrs,Missing}, ground_truth/<defect>/<stem><suffix>.png."""
    for cls in classes:
        c = root / cls
        for i in range(3):
            _png(c / "train" / "good" / f"{i}.png")
        _png(c / "test" / "good" / "0.png")
        for defect in ("Burrs", "Missing"):
            _png(c / "test" / defect / "0.png", 200)
            _mask(c / "ground_truth" / defect / f"0{mask_suffix}.png", (2, 2, 6, 6))
    return root


def _prepare(root: Path, dataset: str, *extra: str) -> int:
    return prepare_data.main(["--dataset", dataset, "--root", str(root), "--no-progress", *extra])


def _cfg(root: Path, layout: str, validation: str | None = None) -> ADDefaults:
    cfg = ADDefaults()
    # batches of 4: MVTec AD 2's third batch mixes test and validation images
    for key, value in dict(root=str(root), image_size=[H, W], batch_size=4, num_workers=0).items():
        setattr(cfg.data, key, value)
    cfg.data.layout, cfg.data.validation = layout, validation
    cfg.derive()
    return cfg


def _score(cfg: ADDefaults, evaluator: ADEvaluator) -> int:
    """The real test loader and scoring, with a map that is each pixel's mean over the channels."""
    _, test = build_loaders(cfg, CPU, 4, logging.getLogger("test"), train=False)

    def predict(imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = imgs.mean(1)
        return maps, maps.flatten(1).amax(1)

    return score_test_set(predict, test, evaluator, CPU, (H, W), lambda *args: None)


def _class_maps_and_masks(evaluator: ADEvaluator, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """The test maps and masks the evaluator holds for ``cls`` (what its metrics read)."""
    store = evaluator._stores[cls]
    return np.asarray(store.maps()), store.masks()


def test_mvtec2_public_test_and_held_out_validation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _mvtec2(tmp_path / "mvtec2")
    assert _prepare(root, "mvtec2") == 0
    out = capsys.readouterr().out
    assert "can/test_private, can/test_private_mixed, rice/test_private" in out and "no ground truth" in out
    meta = json.loads((root / "meta.json").read_text())
    assert {c: len(v) for c, v in meta["validation"].items()} == {"can": 2, "rice": 2}
    bad = [it for it in meta["test"]["can"] if it["anomaly"]]
    assert [it["mask_path"] for it in bad] == [
        "can/test_public/ground_truth/bad/000_regular_mask.png",
        "can/test_public/ground_truth/bad/001_overexposed_mask.png",
    ]
    assert not any(
        "private" in it["img_path"] for s in ("train", "test") for v in meta[s].values() for it in v
    )
    assert _prepare(root, "mvtec2", "--check") == 0

    quiet = {"image_size": [H, W], "log": lambda s: None}
    assert len(DefaultAD(root, "train", validation="held_out", **quiet)) == 6  # validation not trained on
    assert len(DefaultAD(root, "train", **quiet)) == 10  # the authors' default adds it
    test = DefaultAD(root, "test", validation="held_out", **quiet)
    assert test.item_splits == ["test"] * 6 + ["validation"] * 4
    item = test[1]  # can/test_public/bad/000_regular.png
    assert item["split"] == "test" and item["anomaly"] == 1
    assert int(item["img_mask"].sum()) == 4 * 3 and item["img_mask"][0, 0, :4].all()

    evaluator = ADEvaluator(device="cpu", metrics=["I-AUROC", "SegF1"], segf1_threshold="validation")
    assert _score(_cfg(root, "mvtec2", "held_out"), evaluator) == 10
    assert evaluator.validation_classes == ["can", "rice"]
    maps, scores = evaluator.validation_maps("can")
    assert maps.shape == (2, H, W) and scores.shape == (2,)
    grey = np.mean([(100 / 255 - m) / sd for m, sd in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert np.allclose(maps.astype(np.float64), grey, rtol=0, atol=2.5e-4)  # float16 storage near 0.25
    results = evaluator.compute()
    assert evaluator.num_samples == 6  # the test set alone reaches the metrics
    assert results["can"]["I-AUROC"] == 1.0  # bad images (200) are brighter than good ones (100)
    # SegF1 at the validation maps' mean + 3 std (all grey: the threshold is their value), so
    # every brighter pixel is predicted: the defect's and the rest of the bright bad images
    threshold = float(maps.astype(np.float64).mean() + 3 * maps.astype(np.float64).std())
    want = seg_f1(*_class_maps_and_masks(evaluator, "can"), threshold)
    assert 0 < results["can"]["SegF1"] == pytest.approx(want)
    evaluator.reset()
    assert evaluator.validation_maps("can") is None


def test_loco_masks_merge_and_groups_are_reported_apart(tmp_path: Path) -> None:
    root = _loco(tmp_path / "loco")
    assert _prepare(root, "loco") == 0
    meta = json.loads((root / "meta.json").read_text())
    item = next(
        it for it in meta["test"]["breakfast_box"] if it["img_path"].endswith("logical_anomalies/001.png")
    )
    assert item["mask_path"] == f"breakfast_box/{LOCO_MERGED}/logical_anomalies/001.png"
    assert item["group"] == "logical" and item["specie_name"] == "logical_anomalies"
    merged = np.asarray(Image.open(root / item["mask_path"]))
    assert set(np.unique(merged)) == {0, 255} and int((merged > 0).sum()) == 3 * 2 + 4 * 4  # both PNGs
    assert _prepare(root, "loco", "--check") == 0

    quiet = {"image_size": [H, W], "log": lambda s: None}
    assert len(DefaultAD(root, "train", **quiet)) == 2 * (3 + 1)  # validation trains, as in ADer
    test = DefaultAD(root, "test", **quiet)
    index = [p for p, *_ in test.items].index(str(root / item["img_path"]))
    assert test[index]["group"] == "logical" and int(test[index]["img_mask"].sum()) == 22
    assert test[0]["group"] == ""  # a normal image belongs to every group

    evaluator = ADEvaluator(device="cpu")
    assert _score(_cfg(root, "loco"), evaluator) == 2 * 6
    results = evaluator.compute()
    # scores: logical 200 > normal 100 > structural 20, so 2x2 normal pairs each
    assert results["breakfast_box/logical"]["I-AUROC"] == 1.0
    assert results["breakfast_box/structural"]["I-AUROC"] == 0.0
    assert results["breakfast_box"]["I-AUROC"] == 0.5  # (2*2 won + 2*2 lost) / 8 pairs
    assert results["mean/logical"]["I-AUROC"] == 1.0
    # the two classes are alike, so their mean is either's row; the group rows stay out of it
    # (with them, I-AP would read (2 * 5/6 + 2 * 1 + 2 * 1/2) / 6 instead of 5/6)
    assert results["pushpins"] == pytest.approx(results["breakfast_box"])
    assert results["mean"] == pytest.approx(results["breakfast_box"])
    assert results["breakfast_box"]["I-AP"] == pytest.approx(5 / 6)
    table = format_table({k: v for k, v in results.items() if k != "mean"}).splitlines()
    names = [line.split("|")[1].strip() for line in table[2:] if line.startswith("|")]
    assert names[:3] == ["breakfast_box", "pushpins", "mean"] and "mean/structural" in names[3:]


def test_loco_mask_folder_of_mismatched_sizes_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gt" / "000"
    _mask(folder / "000.png", (0, 0, 2, 2))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(folder / "001.png")
    with pytest.raises(DataError, match=r"masks in .*000 differ in size \(001\.png is 5x5\)"):
        merge_mask_folder(folder, tmp_path / "out.png")
    (folder / "001.png").unlink()
    (tmp_path / "blocked").write_text("")  # a file where the output folder would go
    with pytest.raises(DataError, match=r"cannot write the merged mask .*blocked.*make it writable"):
        merge_mask_folder(folder, tmp_path / "blocked" / "out.png")
    merge_mask_folder(folder, tmp_path / "out.png")
    assert int((np.asarray(Image.open(tmp_path / "out.png")) == 255).sum()) == 2 * 2


@pytest.mark.parametrize(
    "dataset, classes, suffix",
    [("mad_sim", ("01Gorilla", "20Puppy"), "_mask"), ("mad_real", ("Bear", "Whale"), "")],
)
def test_mad_layouts(
    tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str, classes: tuple[str, str], suffix: str
) -> None:
    root = _mad(tmp_path / dataset, classes, suffix)
    assert _prepare(root, dataset) == 0
    assert "classes not under" in capsys.readouterr().out  # a partial download is said so
    meta = json.loads((root / "meta.json").read_text())
    masks = sorted(it["mask_path"] for it in meta["test"][classes[0]] if it["anomaly"])
    assert masks == [f"{classes[0]}/ground_truth/{d}/0{suffix}.png" for d in ("Burrs", "Missing")]
    evaluator = ADEvaluator(device="cpu")
    assert _score(_cfg(root, dataset), evaluator) == 2 * 3
    assert sorted(evaluator.compute()) == [*sorted(classes), "mean"]


@pytest.mark.parametrize(
    "dataset, build, remove",
    [
        ("mvtec2", _mvtec2, "rice/test_public/ground_truth/bad"),
        ("mvtec2", _mvtec2, "can/validation"),
        ("loco", _loco, "pushpins/ground_truth/structural_anomalies"),
        ("mad_sim", lambda r: _mad(r, ("01Gorilla",), "_mask"), "01Gorilla/ground_truth/Burrs"),
    ],
)
def test_a_tree_that_does_not_match_names_the_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, dataset: str, build, remove: str
) -> None:
    root = build(tmp_path / "d")
    for path in sorted((root / remove).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / remove).rmdir()
    assert _prepare(root, dataset) != 0
    err = capsys.readouterr().err
    assert f"missing folder(s) {root / remove}" in err and f"--dataset {dataset} expects" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (root / "meta.json").exists()


def test_a_root_without_classes_and_a_config_without_data_are_explained(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert _prepare(tmp_path / "empty", "loco") != 0
    with pytest.raises(DataError) as err:
        DefaultAD(tmp_path / "none", "train", image_size=8, layout="mvtec2", log=lambda s: None)
    message = str(err.value)
    assert f"data.root={tmp_path / 'none'} does not exist" in message
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad-2" in message
    assert f"python tools/prepare_data.py --dataset mvtec2 --root {tmp_path / 'none'}" in message
    root = _mvtec2(tmp_path / "mvtec2")  # extracted but not prepared
    with pytest.raises(DataError, match=r"has no meta\.json.*--dataset mvtec2"):
        DefaultAD(root, "train", image_size=8, layout="mvtec2", log=lambda s: None)
    assert _prepare(root, "mvtec2") == 0
    meta = json.loads((root / "meta.json").read_text())
    del meta["validation"]
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"data\.validation=held_out but .* has no 'validation' split"):
        DefaultAD(root, "train", image_size=8, validation="held_out", log=lambda s: None)
