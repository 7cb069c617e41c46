"""Decoded images as the model reads them, shared by the data pipeline, the Python API and the
runtime without PyTorch (this module imports only Pillow and numpy).

Camera photos keep their pixels as the sensor read them and say in EXIF how to turn them: every
reader of images and masks (training, evaluation, ``tools/prepare_data.py``, predict, the API,
the runtime) turns them upright first (:func:`upright`), as photo viewers show them, so a mask
drawn on the photo as seen lines up with it. :func:`to_rgb` turns any Pillow mode into 8-bit RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag
_SIDES_SWAPPED = (5, 6, 7, 8)  # transposed or turned by 90 degrees


def orientation(im: Image.Image) -> int:
    """The EXIF orientation of ``im`` (1: stored upright, also when there is none)."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: take the pixels as stored
        return 1
    return value if value in range(1, 9) else 1


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says (the same image when it is stored upright)."""
    return im if orientation(im) == 1 else ImageOps.exif_transpose(im)


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` once upright, from its header alone (Pillow turns TIFF files
    itself: their opened size is already upright)."""
    w, h = im.size
    if im.format == "TIFF":
        return w, h
    return (h, w) if orientation(im) in _SIDES_SWAPPED else (w, h)


def to_rgb(im: Image.Image, small_ints_are_8bit: bool = False) -> Image.Image:
    """Any Pillow mode as 8-bit RGB. 16-bit images (``I;16``) and 32-bit integer ones (``I``) are
    rescaled from 0..65535 (``I``: from their maximum above that); with ``small_ints_are_8bit``
    (an array handed over in memory, not a file) an ``I`` image whose values all lie in 0..255
    is 8-bit data in a wider type and kept as it is. Float images (``F``) are rescaled from 0..1,
    or kept when larger. Nothing is clipped that a rescale can keep."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif small_ints_are_8bit and peak <= 255:
            top = 255.0
        else:
            top = 65535.0 if peak <= 65535 else peak
        gray = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        factor = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        gray = np.clip(arr * factor + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")
