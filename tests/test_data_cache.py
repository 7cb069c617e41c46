"""DefaultAD's Real-IAD features (views, sample ids) and its decoded-image cache (memory and npy)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.default_ad import DefaultAD
from data.meta import DataError, write_meta
from data.prepare import prepare_realiad
from data.synthetic import generate_demo_dataset


def quiet(_msg: str) -> None:
    """A ``log`` that swallows messages."""


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "demo"
    return generate_demo_dataset(
        root, image_size=48, n_train=3, n_test_good=2, n_test_bad=3, classes=["wood"]
    )


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (20, 14)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    return path.name


def _realiad(root: Path) -> Path:
    """Class ``audio``: 2 OK training samples and 1 OK + 1 NG test sample, views C1..C3 each."""
    train, test = [], []
    for s, (kind, split) in enumerate([("OK", train), ("OK", train), ("OK", test), ("NG/AK", test)]):
        for view in ("C1", "C2", "C3"):
            rel = f"{kind}/S{s:04d}/audio_{s:04d}_{kind[:2]}_{view}_20230922.jpg"
            _jpeg(root / "audio" / rel, seed=s * 10 + int(view[1]))
            rec = {"image_path": rel, "mask_path": None, "anomaly_class": "OK"}
            if kind != "OK":
                mask = np.zeros((14, 20), np.uint8)
                mask[3:9, 4:12] = 255
                Image.fromarray(mask).save(root / "audio" / rel.replace(".jpg", "_mask.png"))
                rec.update(mask_path=rel.replace(".jpg", "_mask.png"), anomaly_class="AK")
            split.append(rec)
    (root / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons" / "audio.json").write_text(json.dumps({"train": train, "test": test}))
    write_meta(root, prepare_realiad(root)[0])
    return root


def test_realiad_views_and_sample_ids(tmp_path: Path) -> None:
    root = _realiad(tmp_path / "realiad")
    test = DefaultAD(root, "test", image_size=16, log=quiet)
    assert len(test) == 6
    items = [test[i] for i in range(len(test))]
    assert [it["sample_id"] for it in items] == ["audio/OK/S0002"] * 3 + ["audio/NG/AK/S0003"] * 3
    assert [it["anomaly"] for it in items] == [0, 0, 0, 1, 1, 1]
    assert all(it["img_mask"].sum() > 0 for it in items[3:])

    picked = DefaultAD(root, "test", image_size=16, views="C1,c3", log=quiet)
    assert [Path(p).stem.split("_")[-2] for p, *_ in picked.items] == ["C1", "C3", "C1", "C3"]
    batch = next(iter(DataLoader(picked, batch_size=4)))
    assert batch["sample_id"] == [
        "audio/OK/S0002",
        "audio/OK/S0002",
        "audio/NG/AK/S0003",
        "audio/NG/AK/S0003",
    ]
    assert len(DefaultAD(root, "train", image_size=16, views=["C2"], log=quiet)) == 2

    with pytest.raises(DataError, match=r"view\(s\) C9 not in .*meta\.json; available views: C1, C2, C3"):
        DefaultAD(root, "test", image_size=16, views=["C1", "C9"], log=quiet)


def test_views_on_single_view_data_and_partial_sample_ids(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no 'view' field.*set data\.views=None"):
        DefaultAD(demo_root, "test", views=["C1"], log=quiet)
    assert "sample_id" not in DefaultAD(demo_root, "test", image_size=16, log=quiet)[0]

    root = _realiad(tmp_path / "realiad")
    meta = json.loads((root / "meta.json").read_text())
    meta["test"]["audio"][4]["sample_id"] = ""
    write_meta(root, meta)
    with pytest.raises(
        DataError, match=r"5 of 6 items have a 'sample_id' but audio/NG/AK/S0003/\S+ has none"
    ):
        DefaultAD(root, "test", log=quiet)


def _all(ds: DefaultAD) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["img"], y["img"]) and torch.equal(x["img_mask"], y["img_mask"])
        assert x["img"].dtype == y["img"].dtype == torch.float32
        assert x["img_mask"].dtype == y["img_mask"].dtype == torch.float32
        assert {k: v for k, v in x.items() if k not in ("img", "img_mask")} == {
            k: v for k, v in y.items() if k not in ("img", "img_mask")
        }


@pytest.mark.parametrize("mode", ["memory", "npy"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cached_items_equal_uncached(demo_root: Path, tmp_path: Path, mode: str, split: str) -> None:
    plain = _all(DefaultAD(demo_root, split, image_size=(24, 40), log=quiet))
    cached = DefaultAD(demo_root, split, image_size=(24, 40), cache=mode, cache_dir=tmp_path, log=quiet)
    assert cached.cache is not None
    _assert_same(plain, _all(cached))
    assert any(it["img_mask"].sum() > 0 for it in plain) == (split == "test")
    if mode == "npy":
        assert isinstance(cached.cache.images, np.memmap)
        _assert_same(plain, _all(pickle.loads(pickle.dumps(cached))))  # what spawned workers receive


def test_npy_cache_is_reused_not_decoded_again(demo_root: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    DefaultAD(demo_root, "test", image_size=16, cache="npy", cache_dir=tmp_path, log=logs.append)
    assert sum("decoding" in m for m in logs) == 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and any(f.endswith(".masks.npy") for f in files)

    (demo_root / "wood" / "test" / "good" / "000.png").rename(demo_root / "moved.png")
    try:  # a reused cache never opens the image files
        again = DefaultAD(demo_root, "test", image_size=16, cache="npy", cache_dir=tmp_path, log=logs.append)
        assert again[0]["img"].shape == (3, 16, 16)
    finally:
        (demo_root / "moved.png").rename(demo_root / "wood" / "test" / "good" / "000.png")
    assert sum("decoding" in m for m in logs) == 1


def test_npy_cache_rebuilt_for_new_size_and_changed_meta(demo_root: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    kw = {"cache": "npy", "cache_dir": tmp_path, "log": logs.append}
    DefaultAD(demo_root, "train", image_size=16, **kw)
    bigger = DefaultAD(demo_root, "train", image_size=20, **kw)
    assert bigger[0]["img"].shape == (3, 20, 20) and bigger.cache.images.shape[1:] == (20, 20, 3)
    assert sum("decoding" in m for m in logs) == 2
    _assert_same(_all(DefaultAD(demo_root, "train", image_size=20, log=quiet)), _all(bigger))

    meta_path = demo_root / "meta.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["train"]["wood"] = meta["train"]["wood"][::-1]
    try:
        write_meta(demo_root, meta)
        reordered = DefaultAD(demo_root, "train", image_size=20, **kw)
        assert any("stale" in m for m in logs) and sum("decoding" in m for m in logs) == 3
        _assert_same(_all(DefaultAD(demo_root, "train", image_size=20, log=quiet)), _all(reordered))
    finally:
        meta_path.write_text(original)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "no-manifest"])
def test_damaged_npy_cache_is_detected_and_rebuilt(demo_root: Path, tmp_path: Path, damage: str) -> None:
    logs: list[str] = []
    kw = {"image_size": 16, "cache": "npy", "cache_dir": tmp_path, "log": logs.append}
    reference = _all(DefaultAD(demo_root, "test", **kw))
    images = next(tmp_path.glob("*.images.npy"))
    manifest = next(tmp_path.glob("*.json"))
    data = images.read_bytes()
    if damage == "truncate":
        images.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        images.write_bytes(data[:-10] + bytes(255 - b for b in data[-10:]))
    elif damage == "manifest":
        manifest.write_text("{not json")
    else:
        manifest.unlink()
    rebuilt = DefaultAD(demo_root, "test", **kw)
    assert sum("decoding" in m for m in logs) == 2
    assert damage == "no-manifest" or any("damaged" in m for m in logs)
    _assert_same(reference, _all(rebuilt))
    assert images.read_bytes() == data


def test_cache_errors(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.cache must be None, 'memory' or 'npy', got 'disk'"):
        DefaultAD(demo_root, "test", cache="disk", log=quiet)
    mask = next((demo_root / "wood" / "ground_truth").rglob("*.png"))
    original = mask.read_bytes()
    try:
        Image.fromarray(np.zeros((5, 7), np.uint8)).save(mask)
        with pytest.raises(DataError, match=r"mask .* is 7x5 but its image"):
            DefaultAD(demo_root, "test", image_size=16, cache="memory", log=quiet)
    finally:
        mask.write_bytes(original)


def test_read_only_root_falls_back_to_home_cache(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ro"
    shutil.copytree(demo_root, root)
    (root / ".cache").write_text("a file where the cache folder would go: the folder cannot be made")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    logs: list[str] = []
    ds = DefaultAD(root, "train", image_size=16, cache="npy", log=logs.append)
    assert any("is read-only; caching decoded images in" in m for m in logs)
    assert len(list((tmp_path / "home" / ".cache" / "mambaad").rglob("*.images.npy"))) == 1
    _assert_same(_all(DefaultAD(root, "train", image_size=16, log=quiet)), _all(ds))
    with pytest.raises(
        DataError, match=r"cache folder .*\.cache cannot be written; choose another cache_dir"
    ):
        DefaultAD(root, "train", cache="npy", cache_dir=root / ".cache", log=quiet)
