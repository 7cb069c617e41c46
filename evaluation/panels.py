"""Pictures of one prediction at the photo's own size: heat-map overlay, mask outline, and a panel
(photo | heat map | mask outline) with its colour scale written under it.

NumPy and Pillow only (no torch, no matplotlib), so ``tools/predict.py`` draws thousands of them
quickly and also with an exported model where PyTorch is absent.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HEAT_STOPS = np.array([0.0, 0.35, 0.65, 1.0])
HEAT_RGB = np.array([[0, 0, 160], [0, 220, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
OUTLINE_RGB = (255, 0, 255)
SCALE_TEXT = (
    "heat map colours: anomaly map value from {vmin} (dark blue, normal) to {vmax} (red, most anomalous); "
    "one scale for every image, so colours compare across images; magenta outline = predicted mask "
    "(map >= pixel threshold)"
)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a blue-cyan-yellow-red ramp (jet-like)."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, HEAT_STOPS, HEAT_RGB[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend the heat map of ``amap`` (scaled to [vmin, vmax]) over an RGB uint8 image of its size."""
    scaled = (amap - vmin) / max(vmax - vmin, 1e-12)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heat_colors(scaled).astype(np.float32)
    return blended.round().astype(np.uint8)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The border pixels of a bool mask (pixels of the mask with a 4-neighbour outside it)."""
    mask = np.asarray(mask, bool)
    inner = mask.copy()
    for _ in range(max(1, width)):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def draw_outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with the outline of ``mask`` drawn in magenta (line width about 1/250 of the image)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    width = max(1, round(max(mask.shape) / 250))
    out[outline(mask, width)] = OUTLINE_RGB
    return out


def _fit(image: np.ndarray, height: int) -> Image.Image:
    im = Image.fromarray(image)
    if im.height == height:
        return im
    width = max(1, round(im.width * height / im.height))
    return im.resize((width, height), Image.Resampling.BILINEAR)


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def panel(
    photo: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None,
    vmin: float,
    vmax: float,
    caption: str,
    threshold: float | None = None,
    height: int = 240,
) -> np.ndarray:
    """One RGB uint8 picture: photo | heat-map overlay | mask outline, a colour bar and a caption.

    ``photo``, ``amap`` and ``mask`` share one size (the photo's or the model's); the tiles are scaled
    to ``height`` pixels (at most the photo's height) keeping the aspect. The bar runs from ``vmin``
    to ``vmax`` with the pixel ``threshold`` marked.
    """
    h = min(height, photo.shape[0])
    tiles = [
        _fit(photo, h),
        _fit(overlay(photo, amap, vmin, vmax), h),
        _fit(draw_outline(photo, mask) if mask is not None else photo, h),
    ]
    gap, bar_h, text_h = 4, 12, 28
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    width = max(width, 360)
    canvas = Image.new("RGB", (width, h + bar_h + 2 * text_h + 6), (255, 255, 255))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + gap
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    y = h + 3
    ramp = heat_colors(np.linspace(0.0, 1.0, width))[None].repeat(bar_h, 0)
    canvas.paste(Image.fromarray(ramp), (0, y))
    if threshold is not None and math.isfinite(threshold) and vmax > vmin:
        tx = round((threshold - vmin) / (vmax - vmin) * (width - 1))
        if 0 <= tx < width:
            draw.line([(tx, y - 2), (tx, y + bar_h + 1)], fill=OUTLINE_RGB, width=2)
    y += bar_h + 2
    draw.text((2, y), _fmt(vmin), fill=(0, 0, 0), font=font)
    right = _fmt(vmax)
    draw.text((width - 2 - draw.textlength(right, font=font), y), right, fill=(0, 0, 0), font=font)
    middle = "map value (blue normal .. red anomalous)"
    if threshold is not None and math.isfinite(threshold):
        middle += f"; | pixel threshold {_fmt(threshold)}"
    draw.text(((width - draw.textlength(middle, font=font)) / 2, y), middle, fill=(0, 0, 0), font=font)
    draw.text((2, y + text_h // 2 + 2), caption, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
