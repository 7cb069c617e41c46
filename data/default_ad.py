"""``DefaultAD``: the multi-class anomaly-detection data set read through ``meta.json``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.meta import DataError, load_meta, select_classes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# uint8 -> normalised float as one multiply-subtract: x * _SCALE - _SHIFT == (x / 255 - mean) / std
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, np.float32))).reshape(3, 1, 1)
_SHIFT = (np.asarray(IMAGENET_MEAN, np.float32) / np.asarray(IMAGENET_STD, np.float32)).reshape(3, 1, 1)

_RESAMPLE = Image.Resampling.BILINEAR


def _open(path: str, what: str) -> Image.Image:
    """Open and fully decode ``path``; any failure becomes a DataError naming the file."""
    try:
        im = Image.open(path)
        try:
            im.load()
        except BaseException:
            im.close()
            raise
    except FileNotFoundError as err:
        raise DataError(f"{what} file {path} does not exist; restore it or fix meta.json") from err
    except Exception as err:  # PIL signals corrupt files with many types (OSError, SyntaxError, ...)
        raise DataError(
            f"cannot read {what} file {path} ({type(err).__name__}: {err}); the file is truncated or "
            f"corrupt: re-download the data set or remove the file and its meta.json entry"
        ) from err
    if getattr(im, "fp", None) is not None:  # multi-frame formats keep their file open after load()
        frame = im.copy()
        im.close()
        return frame
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; 16/32-bit integer and float images are rescaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float32)
        scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or arr.max() <= 65535 else 255.0 / arr.max()
        gray = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        gray = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


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


def _read_rgb(path: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 array [H, W, 3] resized to ``size`` (H, W), and the file's own (width, height)."""
    im = _to_rgb(_open(path, "image"))
    src_size = im.size
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), _RESAMPLE)
    return np.asarray(im), src_size


def load_image(path: str | Path, image_size: int | tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """One image as float32 [3, H, W]: ImageNet-normalised, or in [0, 1] with ``normalize=False``."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    arr = _read_rgb(str(path), size)[0].transpose(2, 0, 1).astype(np.float32)
    arr = arr * _SCALE - _SHIFT if normalize else arr / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr))


class DefaultAD(Dataset):
    """Images, pixel masks and labels of the classes listed in ``root/meta.json`` (all classes by default).

    Each item is a dict with ``img`` (float32 [3,H,W], ImageNet-normalised), ``img_mask`` (float32
    [1,H,W] of 0/1), ``cls_name``, ``specie_name``, ``anomaly`` (0/1) and ``img_path``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        cls_names: list[str] | None = None,
        image_size: int | tuple[int, int] = 256,
        meta_file: str = "meta.json",
        log: Callable[[str], Any] = print,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        self.root = str(root)
        self.split = split
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = (int(h), int(w))
        meta = select_classes(load_meta(root, meta_file, log=log), cls_names)
        self.cls_names: list[str] = sorted(meta["train"])
        self.items: list[tuple[str, str, str, str, int]] = [
            (
                os.path.join(self.root, it["img_path"]),
                os.path.join(self.root, it["mask_path"]) if it["mask_path"] else "",
                str(it["cls_name"]),
                str(it["specie_name"]),
                int(it["anomaly"]),
            )
            for cls_name in self.cls_names
            for it in meta[split].get(cls_name, [])
        ]
        if not self.items:
            raise DataError(
                f"no {split} images for class(es) {', '.join(self.cls_names)} in {Path(root) / meta_file}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, mask_path, cls_name, specie, anomaly = self.items[index]
        h, w = self.image_size
        rgb, src_size = _read_rgb(img_path, self.image_size)
        # numpy, not torch: small torch ops pay thread-pool overhead in every data-loader worker
        img = rgb.transpose(2, 0, 1).astype(np.float32, order="C")
        img *= _SCALE
        img -= _SHIFT
        if mask_path:
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
            mask = binary.astype(np.float32)[None]
        else:
            mask = np.zeros((1, h, w), np.float32)
        return {
            "img": torch.from_numpy(img),
            "img_mask": torch.from_numpy(mask),
            "cls_name": cls_name,
            "specie_name": specie,
            "anomaly": anomaly,
            "img_path": img_path,
        }
