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

import contextlib
import difflib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def image_files(
    folder: Path,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
    skip_hidden: bool = False,
    notes: list[str] | None = None,
) -> list[Path]:
    """Files directly inside ``folder`` with one of ``extensions`` (any case), sorted by name.

    ``skip_hidden`` drops dot-files; other files are reported to ``notes`` (when given), so that
    a parser can say what it ignored.
    """
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or (skip_hidden and p.name.startswith(".")):
            continue
        if p.suffix.lower() in extensions:
            out.append(p)
        elif notes is not None:
            notes.append(f"ignored non-image file {p}")
    return out


def mvtec_classes(root: str | Path, normal: str = NORMAL_SPECIE) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that look like MVTec classes (have ``train/<normal>``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "train" / normal).is_dir())


@dataclass(frozen=True)
class MvtecTestImage:
    """One image under ``<cls>/test/<specie>`` and its mask (None when normal or not found)."""

    path: Path
    specie: str
    normal: bool
    mask: Path | None
    gt_dir: Path


def walk_mvtec_class(
    cls_dir: Path,
    normal: str = NORMAL_SPECIE,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
    skip_hidden: bool = False,
    notes: list[str] | None = None,
) -> tuple[list[Path], list[MvtecTestImage]]:
    """The training images and test images of one MVTec-style class folder, each sorted.

    The layout is ``train/<normal>/*``, ``test/{<normal>,<defect>}/*`` and masks
    ``ground_truth/<defect>/<stem>_mask.<ext>`` (else ``<stem>.<ext>``), so that every data set
    laid out like MVTec AD (MPDD, BTAD, the medical sets, custom folders) is read by this one
    walker. ``extensions``, ``skip_hidden`` and ``notes`` apply as in :func:`image_files`;
    ``skip_hidden`` also skips hidden species folders (``.ipynb_checkpoints``), and the mask
    folders add no notes.
    """
    train = image_files(cls_dir / "train" / normal, extensions, skip_hidden, notes)
    test_dir = cls_dir / "test"
    species = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    tests = []
    for specie in species:
        if skip_hidden and specie.startswith("."):  # .ipynb_checkpoints and the like
            continue
        is_normal = specie == normal
        gt_dir = cls_dir / "ground_truth" / specie
        masks: dict[str, Path] = {}
        for p in [] if is_normal else image_files(gt_dir, extensions, skip_hidden):
            masks.setdefault(p.stem, p)
        for img in image_files(test_dir / specie, extensions, skip_hidden, notes):
            mask = None if is_normal else masks.get(f"{img.stem}_mask") or masks.get(img.stem)
            tests.append(MvtecTestImage(img, specie, is_normal, mask, gt_dir))
    return train, tests


def make_item(
    root: Path, img: Path, mask: Path | None, cls_name: str, specie: str, anomaly: int
) -> dict[str, Any]:
    """A meta item for ``img`` (and ``mask``) under ``root``, paths relative to it."""
    return {
        "img_path": img.relative_to(root).as_posix(),
        "mask_path": mask.relative_to(root).as_posix() if mask is not None else "",
        "cls_name": cls_name,
        "specie_name": specie,
        "anomaly": anomaly,
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
        train, tests = walk_mvtec_class(root / cls_name)
        meta["train"][cls_name] = [make_item(root, p, None, cls_name, NORMAL_SPECIE, 0) for p in train]
        for t in tests:
            if not t.normal and t.mask is None:
                raise DataError(
                    f"no mask for anomalous image {t.path}: expected {t.gt_dir}/{t.path.stem}_mask.png "
                    f"(or {t.path.stem}.png); add the mask or remove the image"
                )
        meta["test"][cls_name] = [
            make_item(root, t.path, t.mask, cls_name, t.specie, int(not t.normal)) for t in tests
        ]
    return meta


def write_meta(root: str | Path, meta: Meta, meta_file: str = "meta.json") -> Path:
    """Write ``meta`` to ``root/meta_file`` atomically (temporary file + rename) and return the path."""
    path = Path(root) / meta_file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # no half-written temporary file stays behind
            tmp.unlink(missing_ok=True)
        raise
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


def _check_content(meta: Meta, path: Path) -> None:
    """Raise :class:`DataError` with the first of :func:`content_problems` and how many follow."""
    problems = content_problems(meta, _extra_train_splits(meta, path))
    if problems:
        more = len(problems) - 1
        listed = f" ({more} more: tools/prepare_data.py --check lists them)" if more else ""
        raise DataError(f"{path}: {problems[0]}{listed}")


def content_problems(meta: Meta, extra_train_splits: Sequence[str] = ()) -> list[str]:
    """What a structurally sound meta dict says wrongly, each naming the item and the fix: an item
    listed under another class than its ``cls_name`` (it would be scored as that one), an
    anomalous training image, a class without training or without test images. Training and
    ``tools/prepare_data.py --check`` refuse the same things."""
    problems = []
    for split in ("train", "test", *extra_train_splits):
        for cls_name, items in meta[split].items():
            for i, item in enumerate(items):
                where = f"[{split!r}][{cls_name!r}][{i}] ({item['img_path']})"
                if item["cls_name"] != cls_name:
                    problems.append(
                        f"{where} has cls_name {item['cls_name']!r} but is listed under class "
                        f"{cls_name!r}, so it would be scored as {item['cls_name']!r}; move it under its "
                        f"class or correct its cls_name"
                    )
                if item["anomaly"] == 1 and split == "train":
                    problems.append(
                        f"{where} is anomalous, but training images must be normal (the model learns "
                        f"what normal looks like); move it to 'test' or mark it normal"
                    )
    for cls_name in sorted(set().union(*(meta[s] for s in ("train", "test", *extra_train_splits)))):
        if not meta["train"].get(cls_name):
            problems.append(
                f"class {cls_name!r} has no training images; add normal images under 'train' (its "
                f"training folder) or drop the class (data.cls_names)"
            )
        if not meta["test"].get(cls_name):
            problems.append(
                f"class {cls_name!r} has no test images, so no result would be reported for it; add "
                f"them under 'test' or drop the class (data.cls_names)"
            )
    return problems


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
    cls_names: list[str] | None = None,
) -> Meta:
    """Read and check ``root/meta_file``; build and write it first when missing but ``root`` is MVTec-style.

    Raises :class:`DataError` for a missing root, a root with neither file nor layout, malformed JSON,
    items lacking keys, paths leaving the root (absolute ones unless ``allow_absolute_paths``),
    anomalous items whose mask is missing, and any of :func:`content_problems` in the classes
    ``cls_names`` selects (all when None), which the returned meta is restricted to.
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
    else:
        meta = read_json(path, "fix or delete it (a deleted meta.json is rebuilt from an MVTec-style layout)")
        _check_meta(meta, path, root, allow_absolute_paths)
    meta = select_classes(meta, cls_names)
    _check_content(meta, path)  # of the selected classes: data.cls_names can leave a faulty one out
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
