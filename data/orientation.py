"""Camera photos keep their pixels as the sensor read them and say in EXIF how to turn them.

Every reader of images and masks (training, evaluation, ``tools/prepare_data.py``, predict, the
Python API and the runtime without PyTorch) turns them upright first, as photo viewers show them,
so a mask drawn on the photo as seen lines up with it. Imports only Pillow.
"""

from __future__ import annotations

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
    """(width, height) of ``im`` once upright, from its header alone."""
    w, h = im.size
    return (h, w) if orientation(im) in _SIDES_SWAPPED else (w, h)
