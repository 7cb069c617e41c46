"""Tests of the data layer: demo generator, meta.json handling and the DefaultAD reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from scipy import ndimage

from data import DATASETS
from data.default_ad import IMAGENET_MEAN, IMAGENET_STD, DefaultAD
from data.meta import DataError, build_mvtec_meta, load_meta, select_classes, write_meta
from data.synthetic import DEFECTS, MARKER, generate_demo_dataset

SMALL = {"image_size": 64, "n_train": 3, "n_test_good": 2, "n_test_bad": 3}


def quiet(_msg: str) -> None:
    """A ``log`` that swallows messages."""


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", **SMALL)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def rgb(h: int = 8, w: int = 8, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def make_mvtec(root: Path, classes: tuple[str, ...] = ("bottle",), size: int = 8) -> Path:
    """Per class: 2 train images, 1 good and 1 'crack' test image with a 0/255 mask."""
    for cls in classes:
        for i in range(2):
            save(root / cls / "train" / "good" / f"{i:03d}.png", rgb(size, size))
        save(root / cls / "test" / "good" / "000.png", rgb(size, size))
        save(root / cls / "test" / "crack" / "000.png", rgb(size, size))
        mask = np.zeros((size, size), np.uint8)
        mask[: size // 2] = 255
        save(root / cls / "ground_truth" / "crack" / "000_mask.png", mask)
    return root


def write_single(root: Path, img: np.ndarray, mask: np.ndarray | None, mode: str | None = None) -> Path:
    """A one-class data set whose only test item is ``img`` (anomalous with ``mask`` if given)."""
    save(root / "c" / "train" / "good" / "000.png", rgb())
    img_path = save(root / "c" / "test" / "x" / "000.png", img, mode)
    item = {"img_path": img_path.relative_to(root).as_posix(), "cls_name": "c", "specie_name": "x"}
    if mask is None:
        item.update(mask_path="", anomaly=0)
    else:
        save(root / "c" / "ground_truth" / "x" / "000_mask.png", mask)
        item.update(mask_path="c/ground_truth/x/000_mask.png", anomaly=1)
    train = {"img_path": "c/train/good/000.png", "mask_path": "", "cls_name": "c", "specie_name": "good"}
    write_meta(root, {"train": {"c": [{**train, "anomaly": 0}]}, "test": {"c": [item]}})
    return root


def read_test_item(root: Path, size: int = 8) -> dict:
    return DefaultAD(root, "test", image_size=size, log=quiet)[0]


# --- synthetic demo set -------------------------------------------------------------------------


def test_demo_layout_masks_and_meta(demo_root: Path) -> None:
    meta = json.loads((demo_root / "meta.json").read_text())
    classes = sorted(meta["train"])
    assert len(classes) >= 3
    for cls in classes:
        assert len(list((demo_root / cls / "train" / "good").glob("*.png"))) == SMALL["n_train"]
        assert len(list((demo_root / cls / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
        assert len(meta["test"][cls]) == SMALL["n_test_good"] + SMALL["n_test_bad"]
        for defect in DEFECTS:
            img = np.asarray(Image.open(demo_root / cls / "test" / defect / "000.png"))
            mask = np.asarray(Image.open(demo_root / cls / "ground_truth" / defect / "000_mask.png"))
            assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert set(np.unique(mask)) == {0, 255}
            defect_px = mask > 0
            assert 0.004 <= defect_px.mean() <= 0.05, (cls, defect, defect_px.mean())
            ring = ndimage.binary_dilation(defect_px, iterations=3) & ~defect_px
            contrast = np.abs(img[defect_px].mean(0) - img[ring].mean(0)).max()
            assert contrast > 20, f"{cls}/{defect} is hardly visible (contrast {contrast:.1f})"
    assert (demo_root / MARKER).is_file()


def test_demo_is_deterministic(tmp_path: Path) -> None:
    a = generate_demo_dataset(tmp_path / "a", classes=["wood", "washer"], **SMALL)
    b = generate_demo_dataset(tmp_path / "b", classes=["wood", "washer"], **SMALL)
    c = generate_demo_dataset(tmp_path / "c", classes=["wood", "washer"], seed=1, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "meta.json").read_text() == (b / "meta.json").read_text()
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_demo_is_idempotent_and_repairs_partial_folders(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path / "d", classes=["weave"], **SMALL)
    probe = root / "weave" / "train" / "good" / "000.png"
    original = probe.read_bytes()
    probe.write_bytes(b"edited")
    generate_demo_dataset(root, classes=["weave"], **SMALL)
    assert probe.read_bytes() == b"edited", "a complete folder must be left untouched"

    (root / MARKER).unlink()
    stray = root / "weave" / "train" / "good" / "999.png"
    stray.write_bytes(b"leftover")
    generate_demo_dataset(root, classes=["weave"], **SMALL)
    assert probe.read_bytes() == original and not stray.exists()

    generate_demo_dataset(root, classes=["weave"], **{**SMALL, "n_train": 5})
    assert len(load_meta(root, log=quiet)["train"]["weave"]) == 5
    assert json.loads((root / MARKER).read_text())["n_train"] == 5


# --- meta.json ----------------------------------------------------------------------------------


def test_build_mvtec_meta_counts_paths_and_mask_matching(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, ("zipper", "bottle"))
    save(root / "bottle" / "train" / "good" / "002.JPG", rgb())
    (root / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
    save(root / "bottle" / "test" / "crack" / "001.png", rgb())
    save(root / "bottle" / "ground_truth" / "crack" / "001.png", np.zeros((8, 8), np.uint8))
    (root / "not_a_class" / "test").mkdir(parents=True)

    meta = build_mvtec_meta(root)
    assert list(meta["train"]) == ["bottle", "zipper"]
    assert [it["img_path"] for it in meta["train"]["bottle"]] == [
        "bottle/train/good/000.png",
        "bottle/train/good/001.png",
        "bottle/train/good/002.JPG",
    ]
    crack = [it for it in meta["test"]["bottle"] if it["specie_name"] == "crack"]
    assert [it["mask_path"] for it in crack] == [
        "bottle/ground_truth/crack/000_mask.png",
        "bottle/ground_truth/crack/001.png",
    ]
    good = [it for it in meta["test"]["bottle"] if it["specie_name"] == "good"]
    assert good == [
        {
            "img_path": "bottle/test/good/000.png",
            "mask_path": "",
            "cls_name": "bottle",
            "specie_name": "good",
            "anomaly": 0,
        }
    ]
    assert all(it["anomaly"] == 1 for it in crack)


def test_build_mvtec_meta_rejects_anomaly_without_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    save(root / "bottle" / "test" / "crack" / "007.png", rgb())
    with pytest.raises(DataError, match=r"no mask for anomalous image .*007\.png"):
        build_mvtec_meta(root)


def test_load_meta_generates_missing_file_and_says_so(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, ("a", "b"))
    messages: list[str] = []
    meta = load_meta(root, log=messages.append)
    assert len(messages) == 1 and "meta.json not found" in messages[0] and "(2 classes)" in messages[0]
    assert json.loads((root / "meta.json").read_text()) == meta
    load_meta(root, log=messages.append)
    assert len(messages) == 1, "an existing meta.json must be read, not regenerated"
    with pytest.raises(DataError, match="not found"):
        load_meta(root, meta_file="other.json", generate=False, log=quiet)


def test_load_meta_missing_root_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; set data\.root"):
        load_meta(tmp_path / "nowhere")
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match=r"neither meta\.json nor an MVTec-style layout"):
        load_meta(tmp_path / "random")


def test_load_meta_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text('{\n  "train": {},\n  "test": {,}\n}\n')
    with pytest.raises(DataError, match=r"meta\.json is not valid JSON \(line 3"):
        load_meta(tmp_path)


def _meta_with(root: Path, mutate) -> None:
    meta = build_mvtec_meta(make_mvtec(root))
    mutate(meta)
    write_meta(root, meta)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m["test"]["bottle"][0].pop("specie_name"), r"\['test'\]\['bottle'\]\[0\] lacks key"),
        (lambda m: m["train"].update(bottle=[]), "class 'bottle' has no training images"),
        (
            lambda m: m["test"].update(cable=[{**it, "cls_name": "cable"} for it in m["test"]["bottle"]]),
            "class 'cable' has no training images",
        ),
        # meta.json faults that trained or scored silently before (issue 26)
        (
            lambda m: m["test"].update(cable=m["test"]["bottle"]),
            r"has cls_name 'bottle' but is listed under class 'cable'",
        ),
        (
            lambda m: m["train"]["bottle"].append(m["test"]["bottle"][0]),
            r"\['train'\]\['bottle'\]\[\d+\] \(bottle/test/.*\) is anomalous, but training images must",
        ),
        (lambda m: m["test"].update(bottle=[]), "class 'bottle' has no test images"),
        (lambda m: m.update(test={}), "class 'bottle' has no test images"),
        (lambda m: m["test"]["bottle"][0].update(mask_path=""), "anomalous but has an empty 'mask_path'"),
        (lambda m: m["test"]["bottle"][0].update(mask_path="gone.png"), r"mask file .*gone\.png .*not exist"),
        (lambda m: m.pop("test"), "top level must be an object"),
        (lambda m: m["test"]["bottle"][0].update(anomaly=2), "'anomaly' must be 0 or 1"),
    ],
)
def test_load_meta_rejects_bad_content(tmp_path: Path, mutate, message: str) -> None:
    _meta_with(tmp_path, mutate)
    with pytest.raises(DataError, match=message):
        load_meta(tmp_path)


def test_select_classes_and_suggestion(tmp_path: Path) -> None:
    meta = build_mvtec_meta(make_mvtec(tmp_path, ("bottle", "cable", "screw")))
    picked = select_classes(meta, ["screw", "bottle"])
    assert sorted(picked["train"]) == sorted(picked["test"]) == ["bottle", "screw"]
    assert select_classes(meta, None) is meta
    with pytest.raises(DataError, match=r"'botle' \(did you mean 'bottle'\?\); available: bottle, cable"):
        select_classes(meta, ["botle"])


# --- DefaultAD ----------------------------------------------------------------------------------


def test_default_ad_items_shapes_and_classes(demo_root: Path) -> None:
    train = DATASETS.build("DefaultAD", demo_root, "train", image_size=32, log=quiet)
    assert train.cls_names == sorted(train.cls_names) and len(train.cls_names) >= 3
    assert len(train) == SMALL["n_train"] * len(train.cls_names)
    test = DefaultAD(demo_root, "test", cls_names=["wood"], image_size=(32, 48), log=quiet)
    assert test.cls_names == ["wood"] and len(test) == SMALL["n_test_good"] + SMALL["n_test_bad"]
    items = [test[i] for i in range(len(test))]
    for item in items:
        assert item["img"].shape == (3, 32, 48) and item["img"].dtype == torch.float32
        assert item["img_mask"].shape == (1, 32, 48) and item["img_mask"].dtype == torch.float32
        assert set(item["img_mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["cls_name"] == "wood" and Path(item["img_path"]).is_file()
        assert (item["img_mask"].sum() > 0) == bool(item["anomaly"])
    assert sum(it["anomaly"] for it in items) == SMALL["n_test_bad"]
    with pytest.raises(DataError, match="split must be"):
        DefaultAD(demo_root, "val", log=quiet)


def test_default_ad_imagenet_normalisation(tmp_path: Path) -> None:
    img = np.zeros((6, 10, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 128
    item = read_test_item(write_single(tmp_path, img, None), size=4)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(item["img"].mean((1, 2)), torch.tensor(expected), atol=1e-5)
    assert item["img"].shape == (3, 4, 4), "file size is ignored, the configured size wins"
    assert item["img_mask"].sum() == 0 and item["anomaly"] == 0


@pytest.mark.parametrize(
    ("array", "mode", "gray"),
    [
        (np.full((8, 8), 200, np.uint8), None, 200),
        (np.dstack([np.full((8, 8, 3), 60, np.uint8), np.full((8, 8), 7, np.uint8)]), None, 60),
        (np.full((8, 8), 128 * 257, np.uint16), None, 128),
        (np.full((8, 8), 65535, np.uint16), None, 255),
        (np.full((8, 8), 1, np.uint8), "P", None),
    ],
    ids=["gray", "rgba", "16bit-mid", "16bit-max", "palette"],
)
def test_default_ad_converts_to_three_channels(tmp_path: Path, array: np.ndarray, mode, gray) -> None:
    item = read_test_item(write_single(tmp_path, array, None, mode))
    assert item["img"].shape == (3, 8, 8)
    if gray is not None:
        pixel = item["img"][:, 0, 0] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
        assert torch.allclose(pixel * 255, torch.full((3,), float(gray)), atol=0.6)


def test_default_ad_binarises_soft_masks_before_resize(tmp_path: Path) -> None:
    soft = np.zeros((8, 8), np.uint8)
    soft[:, 2], soft[:, 3], soft[:, 4], soft[:, 5] = 100, 127, 128, 255
    item = read_test_item(write_single(tmp_path / "same", rgb(), soft))
    assert item["img_mask"][0, 0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]

    big = np.zeros((16, 16), np.uint8)
    big[4:12, 4:12] = 140  # every pixel above 127: after binarising, a crisp 8x8 square
    item = read_test_item(write_single(tmp_path / "resize", rgb(16, 16), big), size=8)
    expected = torch.zeros(8, 8)
    expected[2:6, 2:6] = 1
    assert torch.equal(item["img_mask"][0], expected)


@pytest.mark.parametrize(
    "mask",
    [np.eye(8, dtype=bool), np.eye(8, dtype=np.uint16) * 65535, np.eye(8, dtype=np.uint8)],
    ids=["bool", "16bit", "label-map"],
)
def test_default_ad_reads_bool_16bit_and_label_masks(tmp_path: Path, mask: np.ndarray) -> None:
    item = read_test_item(write_single(tmp_path, rgb(), mask))
    assert torch.equal(item["img_mask"][0], torch.eye(8))


def test_default_ad_truncated_image_raises(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    root = write_single(tmp_path, noise, None)
    path = root / "c" / "test" / "x" / "000.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(DataError, match=r"000\.png .*truncated or corrupt: re-download"):
        read_test_item(root)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_default_ad_truncated_mask_raises(tmp_path: Path) -> None:
    root = write_single(tmp_path, rgb(), np.eye(8, dtype=np.uint8) * 255)
    (root / "c" / "ground_truth" / "x" / "000_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match=r"mask file .*000_mask\.png"):
        read_test_item(root)


def test_default_ad_mask_size_mismatch_raises(tmp_path: Path) -> None:
    root = write_single(tmp_path, rgb(8, 8), np.zeros((8, 6), np.uint8) + 255)
    with pytest.raises(DataError, match=r"mask .*000_mask\.png is 6x8 but its image .*000\.png is 8x8"):
        read_test_item(root)
    with pytest.raises(DataError, match=r"do not fit their images"):  # at start-up, before any read
        DefaultAD(root, "test", image_size=8, log=lambda *_: None)


def test_load_image_matches_the_dataset_pipeline(tmp_path: Path) -> None:
    from data.default_ad import load_image
    from data.synthetic import generate_demo_dataset

    root = generate_demo_dataset(
        tmp_path / "d", image_size=32, n_train=2, n_test_good=1, n_test_bad=1, classes=["wood"]
    )
    ds = DefaultAD(root, "test", image_size=24, log=lambda *_: None)
    item = ds[0]
    assert torch.equal(load_image(item["img_path"], 24), item["img"])
    raw = load_image(item["img_path"], (24, 24), normalize=False)
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose((raw - mean) / std, item["img"], atol=1e-5)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_camera_photos_upright_everywhere(tmp_path: Path, orientation: int) -> None:
    # a 16x24 photo as the viewer shows it: a bright top-left corner, the mask drawn on it there;
    # the file stores the pixels turned (as cameras do) with the EXIF tag that turns them back
    from PIL import ImageOps

    from data.default_ad import load_image
    from data.pil_image import upright, upright_size
    from deploy.runtime import read_image
    from mambaad import prepare_image

    shown = np.zeros((16, 24, 3), np.uint8)
    shown[:6, :8] = 250
    mask = np.zeros((16, 24), np.uint8)
    mask[:6, :8] = 255
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = Image.fromarray(shown).transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    root = write_single(tmp_path / "d", rgb(), mask)
    photo = root / "c" / "test" / "x" / "000.png"
    stored.save(photo, exif=exif)
    with Image.open(photo) as im:
        assert im.size != (24, 16) or orientation == 3  # stored turned
        assert upright_size(im) == (24, 16)
        assert np.array_equal(np.asarray(upright(im)), np.asarray(ImageOps.exif_transpose(im)))
        assert np.array_equal(np.asarray(upright(im)), shown)

    item = read_test_item(root, size=8)  # mask and image line up: the check of their sizes passes
    expected = torch.zeros(8, 8)
    expected[:3, :3] = 1  # rows 0-5 of 16 and columns 0-7 of 24, at 8x8
    assert torch.equal(item["img_mask"][0], expected)
    bright = item["img"].mean(0)
    assert bright[:2, :2].min() > bright[5:, 5:].max()  # the bright corner is top-left, as shown
    assert torch.equal(item["img"], load_image(photo, 8))
    with Image.open(photo) as im:  # a PIL image from the user: turned as well, scores the same
        assert torch.equal(prepare_image(im, (8, 8)), load_image(photo, 8))
    assert np.array_equal(read_image(photo, None), shown)  # the runtime without PyTorch


def test_the_runtime_copy_of_the_image_helpers_agrees_with_the_data_pipeline() -> None:
    # deploy/runtime.py stays standalone (it can be copied next to an exported model), so it keeps
    # its own to_rgb and upright; they must turn every mode into the same pixels
    from data import pil_image
    from deploy import runtime

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16)),
        Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.int32)),  # 8-bit values in mode I
        Image.fromarray(rng.integers(0, 70000, (5, 7), dtype=np.int32)),
        Image.fromarray(rng.random((5, 7), dtype=np.float32)),
        Image.fromarray(rng.random((5, 7), dtype=np.float32) * 300),
        Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8)).convert("P"),
    ]
    for im in images:
        for in_memory in (False, True):
            ours = pil_image.to_rgb(im, small_ints_are_8bit=in_memory)
            theirs = runtime.to_rgb(im, small_ints_are_8bit=in_memory)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (im.mode, in_memory)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = images[0].copy()
    turned.info["exif"] = exif.tobytes()
    turned.getexif()[0x0112] = 6
    assert np.array_equal(np.asarray(pil_image.upright(turned)), np.asarray(runtime.upright(turned)))
    assert pil_image.upright(turned).size == (5, 7)


def test_a_faulty_class_that_is_not_selected_does_not_block_the_others(tmp_path: Path) -> None:
    # the message's fix, "drop the class (data.cls_names)", must work
    root = make_mvtec(tmp_path / "d", classes=("bottle", "cable"))
    meta = build_mvtec_meta(root)
    meta["test"]["cable"] = []
    write_meta(root, meta)
    with pytest.raises(DataError, match="class 'cable' has no test images"):
        load_meta(root)
    assert list(load_meta(root, cls_names=["bottle"])["test"]) == ["bottle"]
    assert DefaultAD(root, "test", image_size=8, cls_names=["bottle"], log=quiet).cls_names == ["bottle"]


@pytest.mark.parametrize("fmt", ["png", "tiff", "jpeg"])
def test_upright_size_from_the_header_equals_the_size_once_read(tmp_path: Path, fmt: str) -> None:
    # Pillow turns TIFF files itself on opening (their header size is already upright), not PNG/JPEG
    from data.default_ad import _open
    from data.pil_image import upright_size

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo.{fmt}"
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(path, exif=exif)
    with Image.open(path) as im:
        assert upright_size(im) == _open(str(path), "image").size == (16, 24)
