"""COCO-AD: the semantic anomaly-detection benchmark built from COCO 2017 (as defined by ADer).

Facts of the benchmark (from the ADer authors' data README and generator): the 80 COCO categories,
ordered by category id, form four groups of 20; in split ``x`` (0..3) the categories of group ``x``
are anomalous and the other 60 normal. Training data are the ``train2017`` images with at least one
annotation and none of an anomalous category; the test set is every annotated ``val2017`` image:
normal when none of its instances is of an anomalous category, else anomalous, with a mask that is
the union of those instances' segmentations, saved as ``val2017_mask_ad_20_<x>/<stem>.png``. One
class, ``coco``; the meta file of split ``x`` is ``meta_20_<x>.json``. Polygons are rasterised with
Pillow here (the original used OpenCV), so edge pixels may differ slightly.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data.meta import NORMAL_SPECIE, DataError, Meta, read_json

COCO_CLASS = "coco"
ANOMALY_SPECIE = "anomaly"
GROUP_SIZE = 20
NUM_SPLITS = 4
ANNOTATIONS = {"train": "annotations/instances_train2017.json", "val": "annotations/instances_val2017.json"}


def meta_name(split: int) -> str:
    """File name of the meta of COCO-AD split ``split`` (ADer's name)."""
    return f"meta_{GROUP_SIZE}_{split}.json"


def mask_folder(split: int) -> str:
    """Folder (relative to the root) holding the test masks of split ``split``."""
    return f"val2017_mask_ad_{GROUP_SIZE}_{split}"


def _rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (5-bit groups, ASCII offset 48, delta-coded from the 3rd run)."""
    counts: list[int] = []
    pos = 0
    while pos < len(s):
        value, shift, more = 0, 0, True
        while more:
            c = ord(s[pos]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(counts: list[int] | str, height: int, width: int) -> np.ndarray:
    """Boolean ``[height, width]`` mask of a COCO run-length encoding (column-major, zeros first)."""
    runs = _rle_counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"RLE covers {sum(runs)} pixels, image has {height * width}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(width, height).T


def _paint(mask: Image.Image, draw: ImageDraw.ImageDraw, segmentation: Any, height: int, width: int) -> None:
    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        for poly in segmentation:
            pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
            if len(pts) >= 2:
                draw.polygon(pts, fill=255)
        return
    binary = decode_rle(segmentation["counts"], height, width)
    mask.paste(255, mask=Image.fromarray(binary.astype(np.uint8) * 255))


def _load(path: Path) -> dict[str, Any]:
    """The parsed annotation file (kept for the next split: the train file is about 450 MB)."""
    if not path.is_file():
        raise DataError(
            f"COCO annotation file {path} not found; extract annotations_trainval2017.zip from "
            f"cocodataset.org into the data root"
        )
    st = path.stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _load_cached(name: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    path = Path(name)
    data = read_json(path, "re-download the COCO annotations")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path} lacks the '{key}' list of a COCO instances file; re-download it")
    return data


def anomalous_categories(categories: list[dict[str, Any]], split: int) -> set[int]:
    """Category ids that are anomalous in ``split``: group ``split`` of 20 in category-id order."""
    if not 0 <= split < NUM_SPLITS:
        raise DataError(f"COCO-AD split must be 0..{NUM_SPLITS - 1}, got {split}")
    ids = sorted(int(c["id"]) for c in categories)
    if len(ids) != GROUP_SIZE * NUM_SPLITS:
        raise DataError(f"COCO-AD needs the {GROUP_SIZE * NUM_SPLITS} COCO categories, found {len(ids)}")
    return set(ids[split * GROUP_SIZE : (split + 1) * GROUP_SIZE])


def _annotated_images(data: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(image record, its annotations) for every image with at least one annotation, by file name."""
    anns: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        anns.setdefault(int(ann["image_id"]), []).append(ann)
    images = [im for im in data["images"] if int(im["id"]) in anns]
    return [(im, anns[int(im["id"])]) for im in sorted(images, key=lambda im: im["file_name"])]


def prepare_coco(root: Path, split: int = 0, write_masks: bool = True) -> tuple[Meta, list[str]]:
    """Meta of COCO-AD split ``split`` under ``root``; writes the split's test masks into ``root``."""
    train = _load(root / ANNOTATIONS["train"])
    val = _load(root / ANNOTATIONS["val"])
    anomalous = anomalous_categories(train["categories"], split)
    meta: Meta = {"train": {COCO_CLASS: []}, "test": {COCO_CLASS: []}}
    for im, anns in _annotated_images(train):
        if all(int(a["category_id"]) not in anomalous for a in anns):
            meta["train"][COCO_CLASS].append(_entry(f"train2017/{im['file_name']}", ""))
    masks_dir = root / mask_folder(split)
    if write_masks:
        masks_dir.mkdir(parents=True, exist_ok=True)
    n_masks = 0
    for im, anns in _annotated_images(val):
        img_path = f"val2017/{im['file_name']}"
        bad = [a for a in anns if int(a["category_id"]) in anomalous]
        if not bad:
            meta["test"][COCO_CLASS].append(_entry(img_path, ""))
            continue
        mask_path = f"{mask_folder(split)}/{Path(im['file_name']).stem}.png"
        if write_masks:
            h, w = int(im["height"]), int(im["width"])
            mask = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(mask)
            for a in bad:
                try:
                    _paint(mask, draw, a["segmentation"], h, w)
                except (KeyError, TypeError, ValueError) as err:
                    raise DataError(
                        f"{root / ANNOTATIONS['val']}: annotation {a.get('id')} of {img_path} has an "
                        f"unreadable segmentation ({err}); re-download the COCO annotations"
                    ) from err
            mask.save(root / mask_path)
            n_masks += 1
        meta["test"][COCO_CLASS].append(_entry(img_path, mask_path))
    notes = [f"split {split}: anomalous category ids {sorted(anomalous)}"]
    if write_masks:
        notes.append(f"wrote {n_masks} test masks into {masks_dir}")
    return meta, notes


def _entry(img_path: str, mask_path: str) -> dict[str, Any]:
    anomaly = int(bool(mask_path))
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": COCO_CLASS,
        "specie_name": ANOMALY_SPECIE if anomaly else NORMAL_SPECIE,
        "anomaly": anomaly,
    }
