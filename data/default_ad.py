"""``DefaultAD``: the multi-class anomaly-detection data set read through ``meta.json``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data import as_hw
from data.cache import CACHE_MODES, ImageCache, cache_key
from data.meta import DataError, load_meta, with_extra_train_splits
from data.pil_image import to_rgb, upright, upright_size
from data.prepare import missing_data_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# uint8 -> normalised float as one multiply-subtract: x * _SCALE - _SHIFT == (x / 255 - mean) / std
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, np.float32))).reshape(3, 1, 1)
_SHIFT = (np.asarray(IMAGENET_MEAN, np.float32) / np.asarray(IMAGENET_STD, np.float32)).reshape(3, 1, 1)

_RESAMPLE = Image.Resampling.BILINEAR
VALIDATION_USES = (None, "held_out")  # data.validation: added to training, or kept for the evaluator


_FIXES = {  # (missing, unreadable): what to do, for a data set's file or an image given to score
    "meta": (
        "restore it or fix meta.json",
        "re-download the data set or remove the file and its meta.json entry",
    ),
    "given": ("check the path", "replace the file or leave it out of the images to score"),
}


def _open(path: str, what: str, source: str = "meta") -> Image.Image:
    """Open and fully decode ``path``, turned upright (EXIF orientation, :mod:`data.pil_image`);
    any failure becomes a DataError naming the file and the fix for its ``source`` (``meta``: a
    data set's file, ``given``: an image handed to the API or predict)."""
    missing, unreadable = _FIXES[source]
    try:
        im = Image.open(path)
        try:
            im.load()
        except BaseException:
            im.close()
            raise
    except FileNotFoundError as err:
        raise DataError(f"{what} file {path} does not exist; {missing}") from err
    except Exception as err:  # PIL signals corrupt files with many types (OSError, SyntaxError, ...)
        raise DataError(
            f"cannot read {what} file {path} ({type(err).__name__}: {err}); the file is truncated or "
            f"corrupt: {unreadable}"
        ) from err
    if getattr(im, "fp", None) is not None:  # multi-frame formats keep their file open after load()
        frame = im.copy()
        im.close()
        im = frame
    return upright(im)


def _binarise_mask(im: Image.Image) -> np.ndarray:
    """Boolean defect mask at the file's resolution.

    8-bit masks count as defect above 127 and 16-bit masks above 32767, so soft or anti-aliased edges
    do not widen the mask; a mask whose maximum lies below that threshold is a label map (e.g. VisA
    stores small defect indices), where every non-zero pixel is defect.
    """
    if im.mode == "1":
        return np.asarray(im, dtype=bool)
    if im.mode.startswith("I;16") or im.mode == "I":
        arr, thr = np.asarray(im), 32767
    elif im.mode == "F":
        arr, thr = np.asarray(im), 0.5
    elif im.mode in ("L", "P"):  # palette masks: use the indices, not the colours they map to
        arr, thr = np.asarray(im), 127
    else:
        arr, thr = np.asarray(im.convert("L")), 127
    if arr.max() <= thr:
        return arr > 0
    return arr > thr


def _read_rgb(path: str, size: tuple[int, int], source: str = "meta") -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 array [H, W, 3] resized to ``size`` (H, W), and the file's own (width, height)."""
    im = to_rgb(_open(path, "image", source))
    src_size = im.size
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), _RESAMPLE)
    return np.asarray(im), src_size


def read_rgb(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 array [H, W, 3] of the file, resized to ``size`` (H, W) as the data set resizes it."""
    return _read_rgb(str(path), size)[0]


def _rgb_to_tensor(rgb: np.ndarray, normalize: bool) -> torch.Tensor:
    arr = rgb.transpose(2, 0, 1).astype(np.float32)
    arr = arr * _SCALE - _SHIFT if normalize else arr / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr))


def image_to_tensor(
    im: Image.Image, image_size: int | tuple[int, int], normalize: bool = True
) -> torch.Tensor:
    """A decoded PIL image (any mode) as float32 [3, H, W], exactly as :func:`load_image` prepares files
    (turned upright by its EXIF orientation)."""
    h, w = as_hw(image_size)
    im = to_rgb(upright(im), small_ints_are_8bit=True)
    if im.size != (w, h):
        im = im.resize((w, h), _RESAMPLE)
    return _rgb_to_tensor(np.asarray(im), normalize)


def load_image(path: str | Path, image_size: int | tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """One image given to score, as float32 [3, H, W]: ImageNet-normalised, or in [0, 1] with
    ``normalize=False``; read as the data set reads its files."""
    return _rgb_to_tensor(_read_rgb(str(path), as_hw(image_size), source="given")[0], normalize)


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def _cache_folder(root: str, cache_dir: str | Path | None, log: Callable[[str], Any]) -> Path:
    """``cache_dir``, else ``<root>/.cache``, else (read-only root) a per-root folder under ``~/.cache``."""
    if cache_dir is not None:
        folder = Path(cache_dir)
        if not _writable_dir(folder):
            raise DataError(f"cache folder {folder} cannot be written; choose another cache_dir")
        return folder
    folder = Path(root) / ".cache"
    if _writable_dir(folder):
        return folder
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    fallback = Path.home() / ".cache" / "mambaad" / digest
    if not _writable_dir(fallback):
        raise DataError(f"neither {folder} nor {fallback} can be written; pass a writable cache_dir")
    log(f"data root {root} is read-only; caching decoded images in {fallback}")
    return fallback


class DefaultAD(Dataset):
    """Images, pixel masks and labels of the classes listed in ``root/meta.json`` (all classes by default).

    Each item is a dict with ``img`` (float32 [3,H,W], ImageNet-normalised), ``img_mask`` (float32
    [1,H,W] of 0/1), ``cls_name``, ``specie_name``, ``anomaly`` (0/1) and ``img_path``; plus
    ``sample_id`` (str) when the meta items carry sample ids (Real-IAD: the views of one physical
    sample share it, for sample-level metrics).

    ``views`` keeps only the listed camera views (items with a ``view`` field, e.g. ``["C1", "C3"]``).
    ``cache`` keeps decoded, resized images between epochs (:mod:`data.cache`): ``"memory"`` in RAM
    (filled here, in the main process; forked DataLoader workers share it, spawned ones get a copy
    each), ``"npy"`` as memory-mapped uint8 files in ``cache_dir`` (default ``<root>/.cache``, or a
    folder under ``~/.cache/mambaad`` when the root is read-only).

    Paths in ``meta.json`` must stay under ``root``; ``allow_absolute_paths`` (config key
    ``data.allow_absolute_paths``) also accepts absolute ones, for data kept elsewhere on purpose.

    ``validation`` says what a ``validation`` split of the meta file is for: ``None`` adds it to
    training (the authors' loader; MVTec 3D-AD, MVTec LOCO AD), ``"held_out"`` keeps it out of
    training and appends it to the test split, each item's ``split`` reading ``"validation"`` (else
    ``"test"``), so that the evaluator receives its maps apart from the test set's (MVTec AD 2:
    thresholds chosen on validation data). Items of a meta file with a ``group`` field (MVTec LOCO
    AD: ``logical``/``structural``) carry it (``""`` where absent), so the evaluator can report
    each group apart. ``layout`` (config key ``data.layout``, a ``tools/prepare_data.py --dataset``
    name) turns a missing root or meta file into an error that says where to download the data
    set and the command that prepares it.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        cls_names: list[str] | None = None,
        image_size: int | tuple[int, int] = 256,
        meta_file: str = "meta.json",
        log: Callable[[str], Any] = print,
        views: list[str] | None = None,
        cache: str | None = None,
        cache_dir: str | Path | None = None,
        allow_absolute_paths: bool = False,
        validation: str | None = None,
        layout: str | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        if validation not in VALIDATION_USES:
            raise DataError(f"data.validation={validation!r} is not supported; use None or 'held_out'")
        self.root = str(root)
        self.split = split
        self.image_size = as_hw(image_size)
        meta_path = Path(root) / meta_file
        if layout is not None and not meta_path.is_file():
            raise missing_data_error(layout, Path(root), meta_file)
        meta = load_meta(
            root, meta_file, log=log, allow_absolute_paths=bool(allow_absolute_paths), cls_names=cls_names
        )
        if validation == "held_out" and not isinstance(meta.get("validation"), dict):
            raise DataError(
                f"data.validation=held_out but {meta_path} has no 'validation' split; rebuild it with "
                f"tools/prepare_data.py (e.g. --dataset mvtec2) or set data.validation=None"
            )
        if split == "train" and validation is None:  # a 'validation' split (MVTec 3D-AD) trains too
            meta = with_extra_train_splits(meta, meta_path, log)
        self.cls_names: list[str] = sorted(meta["train"])
        raw = [it for cls_name in self.cls_names for it in meta[split].get(cls_name, [])]
        held = validation == "held_out" and split == "test"
        if held:
            extra = [
                {**it, "split": "validation"} for c in self.cls_names for it in meta["validation"].get(c, [])
            ]
            log(
                f"{meta_path}: its 'validation' split ({len(extra)} images) is held out of training and "
                f"scored after the test set, apart from it (data.validation=held_out)"
            )
            raw = [{**it, "split": "test"} for it in raw] + extra
        if isinstance(views, str):  # "C1,C2" from a command line
            views = [v for v in views.split(",") if v.strip()]
        views = [str(v).strip().upper() for v in views] if views else None
        raw = _select_views(raw, views, meta_path)
        self.sample_ids: list[str] | None = _sample_ids(raw, meta_path)
        self.item_splits: list[str] | None = [it["split"] for it in raw] if held else None
        self.groups: list[str] | None = (
            [str(it.get("group", "")) for it in raw] if any("group" in it for it in raw) else None
        )
        self.items: list[tuple[str, str, str, str, int]] = [
            (
                os.path.join(self.root, it["img_path"]),
                os.path.join(self.root, it["mask_path"]) if it["mask_path"] else "",
                str(it["cls_name"]),
                str(it["specie_name"]),
                int(it["anomaly"]),
            )
            for it in raw
        ]
        if not self.items:
            raise DataError(
                f"no {split} images for class(es) {', '.join(self.cls_names)} in {meta_path}"
                + (f" with views {', '.join(views)}" if views else "")
            )
        _check_mask_sizes(self.items, meta_path)
        self.cache: ImageCache | None = None
        if cache is not None:
            self.cache = self._build_cache(cache, cache_dir, meta_path, cls_names, views, log)

    def _build_cache(
        self,
        mode: str,
        cache_dir: str | Path | None,
        meta_path: Path,
        cls_names: list[str] | None,
        views: list[str] | None,
        log: Callable[[str], Any],
    ) -> ImageCache:
        if mode not in CACHE_MODES:
            raise DataError(f"data.cache must be None, 'memory' or 'npy', got {mode!r}")
        h, w = self.image_size
        has_masks = any(it[1] for it in self.items)
        if mode == "memory":
            return ImageCache.build(mode, self._decode, len(self.items), self.image_size, has_masks, log=log)
        folder = _cache_folder(self.root, cache_dir, log)
        selection = json.dumps([meta_path.name, sorted(cls_names or []), sorted(views or [])])
        name = f"{self.split}_{h}x{w}_{hashlib.sha256(selection.encode()).hexdigest()[:10]}"
        key = cache_key(meta_path.read_bytes(), self.split, [it[:2] for it in self.items], self.image_size)
        return ImageCache.build(
            mode, self._decode, len(self.items), self.image_size, has_masks, key, folder, name, log
        )

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Item ``index`` read from disk: RGB uint8 [H, W, 3] and bool mask [H, W] (None if normal)."""
        img_path, mask_path = self.items[index][:2]
        h, w = self.image_size
        rgb, src_size = _read_rgb(img_path, self.image_size)
        if not mask_path:
            return rgb, None
        mim = _open(mask_path, "mask")
        if mim.size != src_size:
            raise DataError(
                f"mask {mask_path} is {mim.size[0]}x{mim.size[1]} but its image {img_path} is "
                f"{src_size[0]}x{src_size[1]} (width x height); fix or replace the mask"
            )
        binary = _binarise_mask(mim)
        if binary.shape != (h, w):
            soft = Image.fromarray(binary.astype(np.float32), mode="F").resize((w, h), _RESAMPLE)
            binary = np.asarray(soft) > 0.5
        return rgb, binary

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, mask_path, cls_name, specie, anomaly = self.items[index]
        h, w = self.image_size
        if self.cache is not None:
            rgb, binary = self.cache.get(index)
            binary = binary if mask_path else None
        else:
            rgb, binary = self._decode(index)
        # numpy, not torch: small torch ops pay thread-pool overhead in every data-loader worker
        img = rgb.transpose(2, 0, 1).astype(np.float32, order="C")
        img *= _SCALE
        img -= _SHIFT
        mask = np.zeros((1, h, w), np.float32) if binary is None else binary.astype(np.float32)[None]
        out = {
            "img": torch.from_numpy(img),
            "img_mask": torch.from_numpy(mask),
            "cls_name": cls_name,
            "specie_name": specie,
            "anomaly": anomaly,
            "img_path": img_path,
        }
        if self.sample_ids is not None:
            out["sample_id"] = self.sample_ids[index]
        if self.groups is not None:
            out["group"] = self.groups[index]
        if self.item_splits is not None:
            out["split"] = self.item_splits[index]
        return out


def _check_mask_sizes(items: list[tuple[str, str, str, str, int]], meta_path: Path) -> None:
    """Compare mask and image sizes (headers only) at start-up, not at the first evaluation.

    Unreadable files are left to the full read, which names the problem precisely.
    """
    problems = []
    for img_path, mask_path, *_ in items:
        if not mask_path:
            continue
        try:
            with Image.open(img_path) as im, Image.open(mask_path) as mim:
                size, msize = upright_size(im), upright_size(mim)
        except (OSError, SyntaxError, ValueError):
            continue
        if size != msize:
            problems.append(
                f"mask {mask_path} is {msize[0]}x{msize[1]} but its image {img_path} is {size[0]}x{size[1]}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(
            f"{len(problems)} test mask(s) listed in {meta_path} do not fit their images: {shown}. "
            f"Fix or replace those masks (python tools/prepare_data.py --check lists them all)"
        )


def _select_views(
    items: list[dict[str, Any]], views: list[str] | None, meta_path: Path
) -> list[dict[str, Any]]:
    """Items whose ``view`` is in ``views`` (upper-case names, matched case-insensitively); None keeps all."""
    if not views:
        return items
    if any("view" not in it for it in items):
        raise DataError(
            f"data.views={list(views)} but the items of {meta_path} have no 'view' field; only multi-view "
            f"data sets (Real-IAD: tools/prepare_data.py --dataset realiad) have views; set data.views=None"
        )
    available = sorted({str(it["view"]) for it in items})
    wanted = {v.upper() for v in views}
    unknown = sorted(v for v in wanted if v not in {a.upper() for a in available})
    if unknown:
        raise DataError(
            f"view(s) {', '.join(unknown)} not in {meta_path}; available views: "
            f"{', '.join(available) or 'none'}"
        )
    return [it for it in items if str(it["view"]).upper() in wanted]


def _sample_ids(items: list[dict[str, Any]], meta_path: Path) -> list[str] | None:
    """The items' ``sample_id`` strings, or None when no item has one; a partial set is an error."""
    having = sum(1 for it in items if it.get("sample_id"))
    if having == 0:
        return None
    if having != len(items):
        first = next(it for it in items if not it.get("sample_id"))
        raise DataError(
            f"{meta_path}: {having} of {len(items)} items have a 'sample_id' but {first['img_path']} has "
            f"none; give every item one or none (regenerate with tools/prepare_data.py)"
        )
    return [str(it["sample_id"]) for it in items]
