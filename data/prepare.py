"""Parsers that turn the published layouts of AD data sets into the ``meta.json`` format, and a checker.

Each parser takes the data root and returns ``(meta, notes)``: the meta dict (paths relative to the
root) and informational notes (e.g. ignored non-image files). :func:`validate_meta` then opens every
listed file, so that a broken download is found once, before training, with a fix for every problem.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.coco import ANNOTATIONS, prepare_coco
from data.meta import (
    ITEM_KEYS,
    NORMAL_SPECIE,
    TRAIN_EXTRA_SPLITS,
    DataError,
    Meta,
    content_problems,
    image_files,
    make_item,
    mvtec_classes,
    read_json,
    walk_mvtec_class,
)
from data.pil_image import upright_size
from util.progress import Progress

PILLOW_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
Parsed = tuple[Meta, list[str]]

LAYOUTS = {
    "mvtec": "<root>/<cls>/train/good/*.png, <cls>/test/{good,<defect>}/*.png, "
    "<cls>/ground_truth/<defect>/<id>_mask.png",
    "mpdd": "MVTec layout: <root>/<cls>/train/good, <cls>/test/{good,<defect>}, <cls>/ground_truth/<defect>",
    "medical": "MVTec layout: <root>/<cls>/train/good, <cls>/test/{good,<defect>}, "
    "<cls>/ground_truth/<defect>",
    "btad": "<root>/<cls>/train/ok/*, <cls>/test/{ok,ko}/*, <cls>/ground_truth/ko/<stem>.{png,bmp}",
    "visa": "<root>/<cls>/Data/Images/{Normal,Anomaly}/*.JPG, <cls>/Data/Masks/Anomaly/*.png and "
    "<root>/split_csv/1cls.csv (object,split,label,image,mask)",
    "realiad": "<root>/<cls>/{OK,NG/<defect>}/S####/*.jpg (+ _mask.png) and "
    "<root>/realiad_jsons/<cls>.json (or <root>/<cls>.json, or --json-dir)",
    "mvtec3d": "<root>/<cls>/{train,validation}/good/rgb/*.png, <cls>/test/<defect>/{rgb,gt}/*.png",
    "coco": "<root>/annotations/instances_{train,val}2017.json, <root>/train2017/*.jpg, <root>/val2017/*.jpg "
    "(COCO 2017)",
    "folder": "<root>/train/good/*, <root>/test/{good,<defect>}/*, optional <root>/ground_truth/<defect>/* "
    "(or <root>/<cls>/train/good/... for several classes)",
    "mvtec2": "<root>/<cls>/{train,validation}/good/*.png, <cls>/test_public/{good,bad}/*.png, "
    "<cls>/test_public/ground_truth/bad/<stem>_mask.png (MVTec AD 2)",
    "loco": "<root>/<cls>/{train,validation}/good/*.png, "
    "<cls>/test/{good,logical_anomalies,structural_anomalies}/*.png, "
    "<cls>/ground_truth/{logical_anomalies,structural_anomalies}/<stem>/*.png (MVTec LOCO AD)",
    "mad_sim": "<root>/<cls>/train/good/*.png, <cls>/test/{good,<defect>}/*.png, "
    "<cls>/ground_truth/<defect>/<stem>_mask.png (MAD-Sim)",
    "mad_real": "<root>/<cls>/train/good/*, <cls>/test/{good,<defect>}/*, "
    "<cls>/ground_truth/<defect>/<stem>.png (MAD-Real)",
}
# Where to get the data sets whose configs name a layout (data.layout); said when their data is missing.
DOWNLOADS = {
    "mvtec2": ("MVTec AD 2", "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"),
    "loco": ("MVTec LOCO AD", "https://www.mvtec.com/company/research/datasets/mvtec-loco"),
    "mad_sim": (
        "MAD-Sim",
        "https://github.com/EricLee0224/PAD (MAD-Sim: "
        "https://drive.google.com/file/d/1sa7tl84K0lNhJoa8WCH3yiVEhkWP5sLp/view)",
    ),
    "mad_real": ("MAD-Real", "https://github.com/EricLee0224/PAD (the MAD-Real link of its README)"),
}
# The classes of the full data sets: a partial download is prepared with a note naming the others.
KNOWN_CLASSES = {
    "mvtec2": ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts"),
    "loco": ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"),
    "mad_sim": (
        "01Gorilla",
        "02Unicorn",
        "03Mallard",
        "04Turtle",
        "05Whale",
        "06Bird",
        "07Owl",
        "08Sabertooth",
        "09Swan",
        "10Sheep",
        "11Pig",
        "12Zalika",
        "13Pheonix",
        "14Elephant",
        "15Parrot",
        "16Cat",
        "17Scorpion",
        "18Obesobeso",
        "19Bear",
        "20Puppy",
    ),
    "mad_real": (
        "Bear",
        "Bird",
        "Elephant",
        "Parrot",
        "Pig",
        "Puppy",
        "Scorpion",
        "Turtle",
        "Unicorn",
        "Whale",
    ),
}


def _pillow_files(folder: Path, notes: list[str]) -> list[Path]:
    """Files in ``folder`` that Pillow can read by extension; others (not hidden ones) get a note."""
    return image_files(folder, PILLOW_EXTENSIONS, skip_hidden=True, notes=notes)


def _layout_error(dataset: str, root: Path, why: str) -> DataError:
    download = (
        f" (download {DOWNLOADS[dataset][0]} from {DOWNLOADS[dataset][1]})" if dataset in DOWNLOADS else ""
    )
    return DataError(f"{why}; --dataset {dataset} expects {LAYOUTS[dataset]} under --root {root}{download}")


def missing_data_error(layout: str, root: Path, meta_file: str) -> DataError:
    """What a config that names ``data.layout`` says when its data root or meta file is missing:
    the root key, where to download the data set, and the one command that prepares it."""
    name, url = DOWNLOADS.get(layout, (layout, "its publisher"))
    state = "does not exist" if not root.is_dir() else f"has no {meta_file}"
    return DataError(
        f"data.root={root} {state}. Download {name} from {url}, extract it so that the folder holds "
        f"{LAYOUTS[layout]}, then run `python tools/prepare_data.py --dataset {layout} --root {root}` "
        f"(or set data.root=... to where it already is); see docs/data.md"
    )


def _scan_class(root: Path, cls_dir: Path, cls_name: str, normal: str, meta: Meta, notes: list[str]) -> None:
    """MVTec-like class folder with ``normal`` as the name of the normal specie; missing masks stay ""."""
    train, tests = walk_mvtec_class(cls_dir, normal, PILLOW_EXTENSIONS, skip_hidden=True, notes=notes)
    meta["train"][cls_name] = [make_item(root, p, None, cls_name, NORMAL_SPECIE, 0) for p in train]
    meta["test"][cls_name] = [
        make_item(root, t.path, t.mask, cls_name, NORMAL_SPECIE if t.normal else t.specie, int(not t.normal))
        for t in tests
    ]


def _require_dir(dataset: str, root: Path) -> None:
    if not root.is_dir():
        raise _layout_error(dataset, root, f"data root {root} does not exist")


def prepare_mvtec(root: Path, dataset: str = "mvtec") -> Parsed:
    """MVTec AD, MPDD and the medical sets: classes with ``train/good``; a missing mask stays "".

    Unlike :func:`data.meta.build_mvtec_meta` (which stops at the first missing mask), missing masks
    are left for :func:`validate_meta` to report together with every other problem.
    """
    _require_dir(dataset, root)
    classes = mvtec_classes(root)
    if not classes:
        raise _layout_error(dataset, root, f"no class folder with train/good in {root}")
    meta: Meta = {"train": {}, "test": {}}
    notes: list[str] = []
    for cls_name in classes:
        _scan_class(root, root / cls_name, cls_name, NORMAL_SPECIE, meta, notes)
    return meta, notes


def prepare_btad(root: Path) -> Parsed:
    """BTAD: ``ok``/``ko`` instead of ``good``/<defect>; masks named like their image (png or bmp)."""
    _require_dir("btad", root)
    classes = mvtec_classes(root, normal="ok")
    if not classes:
        raise _layout_error("btad", root, f"no class folder with train/ok in {root}")
    meta: Meta = {"train": {}, "test": {}}
    notes: list[str] = []
    for cls_name in classes:
        _scan_class(root, root / cls_name, cls_name, "ok", meta, notes)
    return meta, notes


def prepare_visa(root: Path) -> Parsed:
    """VisA from its official split file ``split_csv/1cls.csv`` (paths in it are relative to the root)."""
    _require_dir("visa", root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise _layout_error("visa", root, f"split file {csv_path} not found")
    meta: Meta = {"train": {}, "test": {}}
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"object", "split", "label", "image", "mask"}
        if not need <= set(reader.fieldnames or []):
            raise _layout_error("visa", root, f"{csv_path} lacks columns {sorted(need)}")
        for row in reader:
            split = row["split"].strip().lower()
            if split not in ("train", "test"):
                continue
            anomaly = int(row["label"].strip().lower() == "anomaly")
            cls_name = row["object"].strip()
            meta["train"].setdefault(cls_name, [])
            meta["test"].setdefault(cls_name, [])
            meta[split][cls_name].append(
                {
                    "img_path": row["image"].strip(),
                    "mask_path": row["mask"].strip() if anomaly else "",
                    "cls_name": cls_name,
                    "specie_name": "anomaly" if anomaly else NORMAL_SPECIE,
                    "anomaly": anomaly,
                }
            )
    return meta, []


_VIEW_RE = re.compile(r"_(C\d+)(?:_|\.|$)")
_SAMPLE_RE = re.compile(r"^S\d+$")


def prepare_realiad(root: Path, json_dir: Path | None = None, views: list[str] | None = None) -> Parsed:
    """Real-IAD from its per-class JSON files; keeps camera ``view`` and ``sample_id``; filters views."""
    _require_dir("realiad", root)
    if json_dir is None:  # the official realiad_jsons/ folder, else JSON files next to the classes
        json_dir = root / "realiad_jsons" if (root / "realiad_jsons").is_dir() else root
    jsons = (
        sorted(p for p in json_dir.glob("*.json") if not p.name.startswith("meta"))
        if json_dir.is_dir()
        else []
    )
    if not jsons:
        raise _layout_error("realiad", root, f"no per-class JSON files in {json_dir}")
    wanted = {v.strip().upper() for v in views} if views else None
    meta: Meta = {"train": {}, "test": {}}
    notes: list[str] = []
    for jpath in jsons:
        cls_name = jpath.stem
        data = read_json(jpath, "re-download the Real-IAD JSON files")
        for split in ("train", "test"):
            items = []
            for i, rec in enumerate(data.get(split, [])):
                if not isinstance(rec, dict) or not rec.get("image_path"):
                    raise DataError(f"{jpath}: {split}[{i}] lacks 'image_path'; re-download the JSON files")
                img = f"{cls_name}/{rec['image_path']}"
                name = Path(img).name
                m = _VIEW_RE.search(name)
                view = m.group(1) if m else ""
                if wanted is not None and view not in wanted:
                    continue
                parts = Path(img).parts
                # the sample folder's path (e.g. audio/NG/AK/S0002): unique across classes and OK/NG
                sample = next((i for i, p in enumerate(parts) if _SAMPLE_RE.match(p)), None)
                sample_id = "/".join(parts[: sample + 1]) if sample is not None else ""
                specie = str(rec.get("anomaly_class", "OK"))
                anomaly = int(specie != "OK")
                mask = rec.get("mask_path") or ""
                items.append(
                    {
                        "img_path": img,
                        "mask_path": f"{cls_name}/{mask}" if anomaly and mask else "",
                        "cls_name": cls_name,
                        "specie_name": NORMAL_SPECIE if not anomaly else specie,
                        "anomaly": anomaly,
                        "view": view,
                        "sample_id": sample_id,
                    }
                )
            meta[split][cls_name] = items
    return meta, notes


def prepare_mvtec3d(root: Path) -> Parsed:
    """MVTec 3D-AD, RGB only: train + validation ``good/rgb`` for training, ``test/<defect>/{rgb,gt}``."""
    _require_dir("mvtec3d", root)
    classes = sorted(p.name for p in root.iterdir() if (p / "train" / "good" / "rgb").is_dir())
    if not classes:
        raise _layout_error("mvtec3d", root, f"no class folder with train/good/rgb in {root}")
    meta: Meta = {"train": {}, "test": {}}
    notes: list[str] = []
    for cls_name in classes:
        cls_dir = root / cls_name
        meta["train"][cls_name] = [
            make_item(root, p, None, cls_name, NORMAL_SPECIE, 0)
            for split in ("train", "validation")
            for p in _pillow_files(cls_dir / split / NORMAL_SPECIE / "rgb", notes)
        ]
        items = []
        test_dir = cls_dir / "test"
        for specie in sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []:
            normal = specie == NORMAL_SPECIE
            for img in _pillow_files(test_dir / specie / "rgb", notes):
                gt = test_dir / specie / "gt" / img.name
                mask = None if normal else (gt if gt.is_file() else None)
                items.append(make_item(root, img, mask, cls_name, specie, 0 if normal else 1))
        meta["test"][cls_name] = items
    return meta, notes


def _known_layout_classes(dataset: str, root: Path, required: Sequence[str], notes: list[str]) -> list[str]:
    """The class folders of ``root`` for ``dataset``: its known class names and any folder with
    ``train/good``. Every ``required`` sub-folder must exist in each, else one error lists the missing
    ones; classes of the full data set that are absent get a note."""
    _require_dir(dataset, root)
    known = KNOWN_CLASSES[dataset]
    classes = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p.name in known or (p / "train" / "good").is_dir())
    )
    if not classes:
        raise _layout_error(dataset, root, f"no class folder ({', '.join(known[:3])}, ...) in {root}")
    missing = [root / c / rel for c in classes for rel in required if not (root / c / rel).is_dir()]
    if missing:
        shown = ", ".join(str(m) for m in missing[:6]) + (
            f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        )
        raise _layout_error(dataset, root, f"missing folder(s) {shown}")
    absent = [c for c in known if c not in classes]
    if absent:
        notes.append(f"classes not under {root}: {', '.join(absent)}; the others are prepared")
    return classes


def prepare_mvtec2(root: Path) -> Parsed:
    """MVTec AD 2: ``train`` for training, ``validation`` kept as its own split, ``test_public`` as test.

    The private test sets have no ground truth (they are scored by MVTec's benchmark server), so
    they are left out with a note.
    """
    notes: list[str] = []
    required = (
        "train/good",
        "validation/good",
        "test_public/good",
        "test_public/bad",
        "test_public/ground_truth/bad",
    )
    classes = _known_layout_classes("mvtec2", root, required, notes)
    meta: Meta = {"train": {}, "validation": {}, "test": {}}
    skipped = []
    for cls_name in classes:
        cls_dir = root / cls_name
        for split, folder in (("train", "train"), ("validation", "validation")):
            meta[split][cls_name] = [
                make_item(root, p, None, cls_name, NORMAL_SPECIE, 0)
                for p in _pillow_files(cls_dir / folder / NORMAL_SPECIE, notes)
            ]
        public = cls_dir / "test_public"
        items = [
            make_item(root, p, None, cls_name, NORMAL_SPECIE, 0)
            for p in _pillow_files(public / "good", notes)
        ]
        for img in _pillow_files(public / "bad", notes):
            mask = public / "ground_truth" / "bad" / f"{img.stem}_mask.png"
            items.append(make_item(root, img, mask if mask.is_file() else None, cls_name, "bad", 1))
        meta["test"][cls_name] = items
        skipped += [
            f"{cls_name}/{s}" for s in ("test_private", "test_private_mixed") if (cls_dir / s).is_dir()
        ]
    if skipped:
        notes.append(
            f"skipped {', '.join(skipped)}: the private test sets have no ground truth (MVTec scores them "
            f"on its benchmark server), so test_public is the test set"
        )
    return meta, notes


LOCO_GROUPS = {"logical_anomalies": "logical", "structural_anomalies": "structural"}
LOCO_MERGED = "ground_truth_merged"  # per class: <defect>/<stem>.png, the union of an image's masks


def merge_mask_folder(folder: Path, out: Path) -> None:
    """Write ``out``: an 8-bit mask, 255 wherever any PNG in ``folder`` is non-zero.

    MVTec LOCO AD stores one PNG per annotated defect of an image, its pixels set to the defect's
    id value; the union is the image's binary ground truth.
    """
    union = None
    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "1") else im) != 0
        if union is not None and arr.shape != union.shape:
            raise DataError(
                f"the masks in {folder} differ in size ({png.name} is {arr.shape[1]}x{arr.shape[0]}); "
                f"re-download the ground truth of this image"
            )
        union = arr if union is None else union | arr
    if union is None:
        raise DataError(f"mask folder {folder} holds no PNG; re-download the ground truth of this image")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(union.astype(np.uint8) * 255, mode="L").save(out)
    except OSError as err:
        raise DataError(
            f"cannot write the merged mask {out} ({err.strerror or err}); the LOCO masks are merged into the "
            f"data root: make it writable (or free space) and rerun"
        ) from err


def prepare_loco(root: Path, progress: bool = True) -> Parsed:
    """MVTec LOCO AD: ``validation`` as its own split (added to training, as the authors' ADer meta);
    test items of the two anomaly kinds carry ``group`` (``logical``/``structural``) so that the
    evaluator reports them apart; each image's mask folder is merged into one binary PNG under
    ``<cls>/ground_truth_merged/`` (:func:`merge_mask_folder`)."""
    notes: list[str] = []
    required = (
        "train/good",
        "validation/good",
        "test/good",
        *(f"{w}/{d}" for d in LOCO_GROUPS for w in ("test", "ground_truth")),
    )
    classes = _known_layout_classes("loco", root, required, notes)
    meta: Meta = {"train": {}, "validation": {}, "test": {}}
    merges: list[tuple[Path, Path]] = []
    for cls_name in classes:
        cls_dir = root / cls_name
        for split in ("train", "validation"):
            meta[split][cls_name] = [
                make_item(root, p, None, cls_name, NORMAL_SPECIE, 0)
                for p in _pillow_files(cls_dir / split / NORMAL_SPECIE, notes)
            ]
        items = [
            make_item(root, p, None, cls_name, NORMAL_SPECIE, 0)
            for p in _pillow_files(cls_dir / "test" / NORMAL_SPECIE, notes)
        ]
        for defect, group in LOCO_GROUPS.items():
            for img in _pillow_files(cls_dir / "test" / defect, notes):
                folder = cls_dir / "ground_truth" / defect / img.stem
                merged = cls_dir / LOCO_MERGED / defect / f"{img.stem}.png"
                if folder.is_dir():
                    merges.append((folder, merged))
                item = make_item(root, img, merged if folder.is_dir() else None, cls_name, defect, 1)
                items.append({**item, "group": group})
        meta["test"][cls_name] = items
    for folder, merged in Progress(merges, "merging LOCO masks", _stderr_line, enabled=progress, every_s=30):
        merge_mask_folder(folder, merged)
    if merges:
        notes.append(f"merged the mask folders of {len(merges)} anomalous images into <cls>/{LOCO_MERGED}/")
    return meta, notes


def prepare_mad(root: Path, dataset: str) -> Parsed:
    """MAD-Sim / MAD-Real (the PAD paper's multi-pose LEGO toys): the MVTec layout with its own class
    names; a test defect folder needs its ``ground_truth`` folder."""
    notes: list[str] = []
    classes = _known_layout_classes(dataset, root, ("train/good", "test"), notes)
    missing = [
        root / c / "ground_truth" / d.name
        for c in classes
        for d in sorted((root / c / "test").iterdir())
        if d.is_dir() and d.name != NORMAL_SPECIE and not d.name.startswith(".")
        if not (root / c / "ground_truth" / d.name).is_dir()
    ]
    if missing:
        raise _layout_error(dataset, root, f"missing folder(s) {', '.join(map(str, missing))}")
    meta: Meta = {"train": {}, "test": {}}
    for cls_name in classes:
        _scan_class(root, root / cls_name, cls_name, NORMAL_SPECIE, meta, notes)
    return meta, notes


def prepare_folder(root: Path) -> Parsed:
    """Custom data: ``train/good``, ``test/<any>`` (``good`` normal), optional ``ground_truth/<any>``.

    One class named after ``root`` when ``root/train/good`` exists, else one class per sub-folder that has
    ``train/good``. Any file Pillow reads by extension is taken; other files are skipped with a note.
    """
    _require_dir("folder", root)
    if (root / "train" / NORMAL_SPECIE).is_dir():
        class_dirs = [(root.resolve().name, root)]
    else:
        class_dirs = [(c, root / c) for c in mvtec_classes(root)]
    if not class_dirs:
        raise _layout_error("folder", root, f"neither {root}/train/good nor <cls>/train/good found")
    meta: Meta = {"train": {}, "test": {}}
    notes: list[str] = []
    for cls_name, cls_dir in class_dirs:
        _scan_class(root, cls_dir, cls_name, NORMAL_SPECIE, meta, notes)
    return meta, notes


def _prepare_coco(root: Path, split: int) -> Parsed:
    """COCO-AD split ``split`` (:mod:`data.coco`); writes the split's test masks under ``root``."""
    _require_dir("coco", root)
    missing = [name for name in ANNOTATIONS.values() if not (root / name).is_file()]
    if missing:
        raise _layout_error("coco", root, f"{', '.join(missing)} not found")
    return prepare_coco(root, split)


PARSERS: dict[str, Callable[..., Parsed]] = {
    "mvtec": lambda root, **_: prepare_mvtec(root, "mvtec"),
    "mpdd": lambda root, **_: prepare_mvtec(root, "mpdd"),
    "medical": lambda root, **_: prepare_mvtec(root, "medical"),
    "btad": lambda root, **_: prepare_btad(root),
    "visa": lambda root, **_: prepare_visa(root),
    "realiad": lambda root, json_dir=None, views=None, **_: prepare_realiad(root, json_dir, views),
    "mvtec3d": lambda root, **_: prepare_mvtec3d(root),
    "folder": lambda root, **_: prepare_folder(root),
    "coco": lambda root, split=0, **_: _prepare_coco(root, split),
    "mvtec2": lambda root, **_: prepare_mvtec2(root),
    "loco": lambda root, progress=True, **_: prepare_loco(root, progress),
    "mad_sim": lambda root, **_: prepare_mad(root, "mad_sim"),
    "mad_real": lambda root, **_: prepare_mad(root, "mad_real"),
}


def _size(path: Path) -> tuple[tuple[int, int] | None, str]:
    """The decoded (width, height) of ``path``, or None and the reason it could not be read."""
    if not path.is_file():
        return None, "does not exist"
    try:
        with Image.open(path) as im:
            im.load()
            return upright_size(im), ""
    except Exception as err:  # Pillow raises many types for corrupt files
        return None, f"cannot be decoded ({type(err).__name__}: {err})"


def _item_problems(root: Path, split: str, it: dict[str, Any]) -> list[str]:
    """Problems of one meta item: its image (and, for an anomalous test image, its mask) on disk."""
    problems = []
    img = root / it["img_path"]
    size, why = _size(img)
    if size is None:
        problems.append(f"image {img} {why}; re-download or remove it and rerun prepare_data")
    if split != "test" or not it["anomaly"]:
        return problems
    if not it["mask_path"]:
        problems.append(
            f"anomalous image {img} has no mask; add it to the ground-truth folder (same stem) or move "
            f"the image to the normal folder"
        )
        return problems
    mask = root / it["mask_path"]
    msize, why = _size(mask)
    if msize is None:
        problems.append(f"mask {mask} {why}; re-download or replace it")
    elif size is not None and msize != size:
        problems.append(
            f"mask {mask} is {msize[0]}x{msize[1]} but image {img} is {size[0]}x{size[1]}; resize or "
            f"replace the mask"
        )
    return problems


def _splits(meta: Meta) -> list[str]:
    """'train', 'test' and the extra training splits (``validation``) that ``meta`` has."""
    return ["train", "test", *(s for s in TRAIN_EXTRA_SPLITS if isinstance(meta.get(s), dict))]


def structure_problems(meta: Any) -> list[str]:
    """Problems of the meta dict's shape (so that ``--check`` on a hand-edited file never crashes)."""
    if not isinstance(meta, dict) or any(not isinstance(meta.get(s), dict) for s in ("train", "test")):
        return ["the meta file's top level must map 'train' and 'test' to {class: [item, ...]}; rebuild it"]
    problems = []
    for split in _splits(meta):
        for cls_name, items in meta[split].items():
            if not isinstance(items, list):
                problems.append(f"[{split!r}][{cls_name!r}] must be a list of items; rebuild the meta file")
                continue
            for i, it in enumerate(items):
                missing = [k for k in ITEM_KEYS if not isinstance(it, dict) or k not in it]
                if missing:
                    problems.append(
                        f"[{split!r}][{cls_name!r}][{i}] lacks {', '.join(missing)}; rebuild the meta file"
                    )
    return problems


def _stderr_line(fmt: str, *args: Any) -> None:
    print(fmt % args, file=sys.stderr, flush=True)


def validate_meta(root: Path, meta: Meta, progress: bool = True, workers: int | None = None) -> list[str]:
    """Every problem of ``meta`` against the files under ``root``, each naming the file and the fix.

    Files are decoded by ``workers`` threads (default: the CPU count, at most 8), in meta order.
    """
    problems = structure_problems(meta)
    if problems:
        return problems
    problems += content_problems(meta, [s for s in _splits(meta) if s not in ("train", "test")])
    items = [(split, it) for split in _splits(meta) for c in sorted(meta[split]) for it in meta[split][c]]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        checked = pool.map(lambda job: _item_problems(root, *job), items)
        bar = Progress(checked, "checking images", _stderr_line, len(items), enabled=progress, every_s=30)
        for found in bar:
            problems.extend(found)
    return problems


def count_table(meta: Meta) -> str:
    """Per-class counts: train normal (with a validation split), test normal, test anomalous, masks; total."""
    header = ("class", "train normal", "test normal", "test anomalous", "masks")
    rows: list[tuple[Any, ...]] = []
    for cls_name in sorted(set(meta["train"]) | set(meta["test"])):
        train = [it for s in _splits(meta) if s != "test" for it in meta[s].get(cls_name, [])]
        test = meta["test"].get(cls_name, [])
        rows.append(
            (
                cls_name,
                sum(1 for it in train if not it["anomaly"]),
                sum(1 for it in test if not it["anomaly"]),
                sum(1 for it in test if it["anomaly"]),
                sum(1 for it in test if it["mask_path"]),
            )
        )
    rows.append(("total", *(sum(r[i] for r in rows) for i in range(1, 5))))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    lines = [
        " | ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
