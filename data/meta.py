"""The ``meta.json`` interchange format: building it from an MVTec-style tree, loading and checking it.

``meta.json`` lists every image of a data set once, so that readers never walk directories on the
training hot path and so that the layouts of MVTec AD, VisA, Real-IAD, ... all reduce to one format::

    {"train": {cls: [item, ...]}, "test": {cls: [item, ...]}}
    item = {"img_path", "mask_path" ("" for normal), "cls_name", "specie_name", "anomaly": 0 | 1}

Paths are relative to the data root and must stay inside it: a path that climbs out of it
(``../x``) is refused, and so is an absolute one unless ``allow_absolute_paths`` (config key
``data.allow_absolute_paths``) is set for data kept elsewhere on purpose. Every problem found while
loading raises :class:`DataError` with a message that names the offending file or key and says how
to fix it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from util.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
SPLITS = ("train", "test")
# Further splits of normal images that training uses too: the official MVTec 3D-AD (and MVTec LOCO)
# meta.json has a 'validation' split, which the authors' loader (ADer DefaultAD) adds to 'train'.
TRAIN_EXTRA_SPLITS = ("validation",)
NORMAL_SPECIE = "good"
FIX_ROOT_HINT = (
    "set data.root to a folder holding meta.json or an MVTec-style layout (<cls>/train/good/...), "
    "or create the demo data set with `python -m data.synthetic <root>`"
)

Meta = dict[str, dict[str, list[dict[str, Any]]]]


class DataError(UserError, ValueError):
    """A data set on disk is missing, malformed or inconsistent; the message says how to fix it."""


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (extension case-insensitive)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def mvtec_classes(root: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that look like MVTec classes (have ``train/good``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    """The mask for image ``stem`` in ``gt_dir``: ``<stem>_mask.<ext>`` first, then ``<stem>.<ext>``."""
    if not gt_dir.is_dir():
        return None
    by_stem: dict[str, list[Path]] = {}
    for p in _image_files(gt_dir):
        by_stem.setdefault(p.stem, []).append(p)
    for candidate in (f"{stem}_mask", stem):
        if candidate in by_stem:
            return by_stem[candidate][0]
    return None


def _item(root: Path, img: Path, mask: Path | None, cls_name: str, specie: str) -> dict[str, Any]:
    return {
        "img_path": img.relative_to(root).as_posix(),
        "mask_path": mask.relative_to(root).as_posix() if mask is not None else "",
        "cls_name": cls_name,
        "specie_name": specie,
        "anomaly": 0 if specie == NORMAL_SPECIE else 1,
    }


def build_mvtec_meta(root: str | Path) -> Meta:
    """Scan an MVTec-style tree into the meta dict (deterministic: classes, defects, files sorted).

    Classes are the sub-folders with ``train/good``. Test images under ``test/good`` are normal; those
    under ``test/<defect>`` are anomalous and must have a mask ``ground_truth/<defect>/<stem>_mask.<ext>``
    (or ``<stem>.<ext>``).
    """
    root = Path(root)
    meta: Meta = {"train": {}, "test": {}}
    for cls_name in mvtec_classes(root):
        cls_dir = root / cls_name
        train_imgs = _image_files(cls_dir / "train" / NORMAL_SPECIE)
        meta["train"][cls_name] = [_item(root, p, None, cls_name, NORMAL_SPECIE) for p in train_imgs]
        test_items: list[dict[str, Any]] = []
        test_dir = cls_dir / "test"
        species = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
        for specie in species:
            gt_dir = cls_dir / "ground_truth" / specie
            for img in _image_files(test_dir / specie):
                mask = None
                if specie != NORMAL_SPECIE:
                    mask = _find_mask(gt_dir, img.stem)
                    if mask is None:
                        raise DataError(
                            f"no mask for anomalous image {img}: expected {gt_dir}/{img.stem}_mask.png "
                            f"(or {img.stem}.png); add the mask or remove the image"
                        )
                test_items.append(_item(root, img, mask, cls_name, specie))
        meta["test"][cls_name] = test_items
    return meta


def write_meta(root: str | Path, meta: Meta, meta_file: str = "meta.json") -> Path:
    """Write ``meta`` to ``root/meta_file`` atomically (temporary file + rename) and return the path."""
    path = Path(root) / meta_file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


PATH_KEYS = ("img_path", "mask_path")
ABSOLUTE_HINT = (
    "for data kept outside the root on purpose set data.allow_absolute_paths=True "
    "(tools/prepare_data.py: --allow-absolute-paths)"
)


def _is_absolute(value: str) -> bool:
    """Absolute here or on another system (``/x``, ``\\x``, ``C:...``): never joined under the root."""
    return os.path.isabs(value) or value.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", value) is not None


def _climbs_out(value: str) -> bool:
    """True when the relative path leaves its root through ``..`` (either separator counts)."""
    depth = 0
    for part in re.split(r"[\\/]+", value):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def path_problem(value: Any, key: str, allow_absolute: bool = False) -> str | None:
    """Why an item's ``img_path``/``mask_path`` must not be read (None when it is fine).

    Paths must be relative to the data root and stay under it; absolute ones pass only with
    ``allow_absolute``. An empty ``mask_path`` (normal image) is fine.
    """
    if not isinstance(value, str):
        return f"{key} must be a string (a path relative to the data root), got {type(value).__name__}"
    if key == "img_path" and not value:
        return "img_path is empty; give the image's path relative to the data root"
    if not value:
        return None
    if _is_absolute(value):
        if allow_absolute:
            return None
        return (
            f"{key} {value!r} is an absolute path; meta.json paths must be relative to the data root: "
            f"fix the entry or move the file under the root, or {ABSOLUTE_HINT}"
        )
    if _climbs_out(value):
        return (
            f"{key} {value!r} leaves the data root through '..'; meta.json paths must stay inside the "
            f"data root: fix the entry or move the file under the root"
        )
    return None


def _check_meta(meta: Any, path: Path, root: Path, allow_absolute_paths: bool = False) -> None:
    """Raise :class:`DataError` on the first structural or on-disk problem of a loaded meta dict."""
    if not isinstance(meta, dict) or any(not isinstance(meta.get(s), dict) for s in SPLITS):
        raise DataError(
            f"{path}: top level must be an object with 'train' and 'test' objects mapping class names "
            f"to lists of items; regenerate it (delete it to rebuild from an MVTec-style layout)"
        )
    for split in (*SPLITS, *_extra_train_splits(meta, path)):
        for cls_name, items in meta[split].items():
            where = f"{path}: [{split!r}][{cls_name!r}]"
            if not isinstance(items, list):
                raise DataError(f"{where} must be a list of items, got {type(items).__name__}")
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DataError(f"{where}[{i}] must be an object, got {type(item).__name__}")
                missing = [k for k in ITEM_KEYS if k not in item]
                if missing:
                    raise DataError(
                        f"{where}[{i}] lacks key(s) {', '.join(missing)}; every item needs "
                        f"{', '.join(ITEM_KEYS)}"
                    )
                for key in PATH_KEYS:
                    problem = path_problem(item[key], key, allow_absolute_paths)
                    if problem:
                        raise DataError(f"{where}[{i}]: {problem} (data root {root})")
                if item["anomaly"] not in (0, 1):
                    raise DataError(f"{where}[{i}]: 'anomaly' must be 0 or 1, got {item['anomaly']!r}")
                if item["anomaly"] == 1 and split in TRAIN_EXTRA_SPLITS:
                    raise DataError(
                        f"{where}[{i}] ({item['img_path']}) is anomalous, but the {split!r} split is "
                        f"added to the training set; move the item to 'test' or remove it"
                    )
                if item["anomaly"] == 1 and split == "test":
                    mask = item["mask_path"]
                    if not mask:
                        raise DataError(
                            f"{where}[{i}] ({item['img_path']}) is anomalous but has an empty "
                            f"'mask_path'; add its mask file or mark it normal"
                        )
                    if not (root / mask).is_file():
                        raise DataError(
                            f"{where}[{i}]: mask file {root / mask} of {item['img_path']} does not "
                            f"exist; restore it or fix 'mask_path'"
                        )
    for cls_name in sorted(set().union(*(meta[s] for s in (*SPLITS, *_extra_train_splits(meta, path))))):
        if not meta["train"].get(cls_name):
            raise DataError(
                f"{path}: class {cls_name!r} has no training images; add them under 'train' or drop "
                f"the class (data.cls_names)"
            )


def _extra_train_splits(meta: dict[str, Any], path: Path) -> list[str]:
    """The :data:`TRAIN_EXTRA_SPLITS` in ``meta``; any other split would be ignored, so it is an error."""
    known = (*SPLITS, *TRAIN_EXTRA_SPLITS)
    for key, value in meta.items():
        if key in TRAIN_EXTRA_SPLITS and not isinstance(value, dict):
            raise DataError(f"{path}: {key!r} must map class names to lists of items like 'train'")
        if key not in known and isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            raise DataError(
                f"{path}: split {key!r} is neither 'train', 'test' nor one added to training "
                f"({', '.join(TRAIN_EXTRA_SPLITS)}), so its images would be ignored; rename or remove it"
            )
    return [s for s in TRAIN_EXTRA_SPLITS if s in meta]


def with_extra_train_splits(meta: Meta, path: str | Path, log: Callable[[str], Any] = print) -> Meta:
    """``meta`` with its :data:`TRAIN_EXTRA_SPLITS` (``validation``) appended to ``train``, logged.

    The authors' loader trains on train + validation wherever a meta.json has a validation split
    (MVTec 3D-AD); doing the same, and saying so, keeps the training set as theirs.
    """
    extra = [s for s in TRAIN_EXTRA_SPLITS if s in meta]
    if not extra:
        return meta
    train = {c: list(items) for c, items in meta["train"].items()}
    for split in extra:
        added = {c: items for c, items in meta[split].items() if items}
        for cls_name, items in added.items():
            train.setdefault(cls_name, []).extend(items)
        count = sum(len(items) for items in added.values())
        log(
            f"{path}: adding its {split!r} split ({count} normal images in {len(added)} classes) to the "
            f"training set, as the authors' loader does"
        )
    return {**{s: v for s, v in meta.items() if s not in extra}, "train": train}


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a UTF-8 JSON file; malformed content is a DataError naming the file, the spot and ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); {fix}"
        ) from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); {fix}") from err


def load_meta(
    root: str | Path,
    meta_file: str = "meta.json",
    generate: bool = True,
    log: Callable[[str], Any] = print,
    allow_absolute_paths: bool = False,
) -> Meta:
    """Read and check ``root/meta_file``; build and write it first when missing but ``root`` is MVTec-style.

    Raises :class:`DataError` for a missing root, a root with neither file nor layout, malformed JSON,
    items lacking keys, paths leaving the root (absolute ones unless ``allow_absolute_paths``),
    classes without training images and anomalous items whose mask is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; {FIX_ROOT_HINT}")
    path = root / meta_file
    if not path.is_file():
        classes = mvtec_classes(root)
        if not classes:
            raise DataError(
                f"data root {root} has neither {meta_file} nor an MVTec-style layout; {FIX_ROOT_HINT}"
            )
        if not generate:
            raise DataError(
                f"{meta_file} not found in {root}; allow generating it or build it with "
                f"data.meta.build_mvtec_meta"
            )
        meta = build_mvtec_meta(root)
        _check_meta(meta, path, root)
        write_meta(root, meta, meta_file)
        log(
            f"{meta_file} not found in {root}; generated it from the MVTec-style layout "
            f"({len(classes)} classes)"
        )
        return meta
    meta = read_json(path, "fix or delete it (a deleted meta.json is rebuilt from an MVTec-style layout)")
    _check_meta(meta, path, root, allow_absolute_paths)
    return meta


def select_classes(meta: Meta, cls_names: list[str] | None) -> Meta:
    """Restrict ``meta`` to ``cls_names`` (``None`` or empty keeps all); unknown names raise DataError."""
    if not cls_names:
        return meta
    available = sorted(meta["train"])
    unknown = [c for c in cls_names if c not in meta["train"]]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DataError(f"unknown class(es) {', '.join(hints)}; available: {', '.join(available) or 'none'}")
    kept = (*SPLITS, *(s for s in TRAIN_EXTRA_SPLITS if s in meta))
    return {split: {c: meta[split].get(c, []) for c in cls_names} for split in kept}
