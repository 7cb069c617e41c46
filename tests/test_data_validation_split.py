"""A meta.json 'validation' split (official MVTec 3D-AD) trains too, as in the authors' loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.default_ad import DefaultAD
from data.meta import DataError
from data.prepare import count_table, validate_meta


def _item(root: Path, rel: str, cls: str, anomaly: int = 0, mask: str = "") -> dict:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
    specie = "crack" if anomaly else "good"
    return {"img_path": rel, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


def _meta(root: Path, **extra: dict) -> Path:
    """Two classes: 2 train, 1 test image each; ``extra`` top-level splits are added as given."""
    meta: dict = {"train": {}, "test": {}}
    for cls in ("bagel", "rope"):
        meta["train"][cls] = [_item(root, f"{cls}/train/good/rgb/{i}.png", cls) for i in range(2)]
        meta["test"][cls] = [_item(root, f"{cls}/test/good/rgb/0.png", cls)]
    meta.update(extra)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _validation(root: Path, counts: dict[str, int]) -> dict:
    return {
        cls: [_item(root, f"{cls}/validation/good/rgb/{i}.png", cls) for i in range(n)]
        for cls, n in counts.items()
    }


def test_validation_split_is_trained_on_and_logged(tmp_path: Path) -> None:
    root = tmp_path / "mvtec3d"
    _meta(root, validation=_validation(root, {"bagel": 3, "rope": 1}))
    logs: list[str] = []
    train = DefaultAD(root, "train", image_size=8, log=logs.append)
    paths = [item[0] for item in train.items]
    assert len(paths) == 2 + 3 + 2 + 1
    assert sum("/validation/" in p for p in paths) == 4
    assert any("'validation' split (4 normal images in 2 classes)" in line for line in logs), logs
    assert len(DefaultAD(root, "test", image_size=8, log=logs.append)) == 2  # test set unchanged

    picked = DefaultAD(root, "train", cls_names=["rope"], image_size=8, log=logs.append)
    assert len(picked) == 3 and "1 normal images in 1 classes" in logs[-1]


def test_prepare_check_counts_and_validates_the_validation_split(tmp_path: Path) -> None:
    root = tmp_path / "mvtec3d"
    _meta(root, validation=_validation(root, {"bagel": 3}))
    meta = json.loads((root / "meta.json").read_text())
    cells = [line.split("|") for line in count_table(meta).splitlines() if "|" in line]
    rows = {c[0].strip(): c[1].strip() for c in cells}
    assert rows["bagel"] == "5" and rows["total"] == "7"  # train normal: 2 train + 3 validation
    (root / "bagel/validation/good/rgb/1.png").unlink()
    problems = validate_meta(root, meta, progress=False)
    assert len(problems) == 1 and "bagel/validation/good/rgb/1.png" in problems[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"val": {"bagel": []}}, r"split 'val' is neither 'train', 'test' nor one added to training"),
        ({"validation": ["x"]}, r"'validation' must map class names to lists of items"),
    ],
)
def test_splits_that_would_be_ignored_stop_with_an_error(tmp_path: Path, extra: dict, message: str) -> None:
    root = _meta(tmp_path / "d", **extra)
    with pytest.raises(DataError, match=message) as err:
        DefaultAD(root, "train", image_size=8, log=lambda s: None)
    assert "meta.json" in str(err.value)


def test_anomalous_validation_item_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "d"
    bad = _item(root, "bagel/validation/crack/rgb/0.png", "bagel", anomaly=1, mask="bagel/x.png")
    _meta(root, validation={"bagel": [bad]})
    message = r"bagel/validation/crack/rgb/0\.png.*anomalous.*added to the training"
    with pytest.raises(DataError, match=message):
        DefaultAD(root, "train", image_size=8, log=lambda s: None)
