"""A small procedurally generated MVTec-style data set, so the project runs end to end without downloads.

Three classes mirror the mix of MVTec AD: two textures (``weave``, a basket-woven fabric; ``wood``, a
wavy grain) whose phase, orientation and illumination vary between normal images, and one object
(``washer``, a notched metal ring) with small pose jitter. Test defects are ``scratch`` (thin bright
or dark curve), ``hole`` (dark irregular blob) and ``stain`` (soft-edged colour blob), each covering
roughly 0.5-5 % of the image and saved with its exact 0/255 pixel mask. Generation is numpy-only,
deterministic in ``seed`` and takes a few seconds for the default size.

Run ``python -m data.synthetic <root>`` to create it from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from data.meta import DataError, build_mvtec_meta, select_classes, write_meta
from util.errors import make_folder

DEMO_CLASSES = ("washer", "weave", "wood")
DEFECTS = ("scratch", "hole", "stain")
MARKER = ".complete"
FORMAT_VERSION = 1
_MIN_AREA, _MAX_AREA = 0.005, 0.05
_STAIN_COLOURS = ((0.62, 0.18, 0.08), (0.12, 0.22, 0.62), (0.32, 0.46, 0.08))

Array = np.ndarray


def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(y, x)``, each ``[size, size]`` float32."""
    ax = np.arange(size, dtype=np.float32)
    return ax[:, None].repeat(size, 1), ax[None, :].repeat(size, 0)


def _smooth_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> Array:
    """Value noise in [-1, 1]: a coarse random lattice bilinearly upsampled to ``[size, size]``."""
    lattice = rng.uniform(-1.0, 1.0, (cells_y + 1, cells_x + 1)).astype(np.float32)

    def axis(cells: int) -> tuple[Array, Array]:
        pos = np.linspace(0.0, cells, size, endpoint=False, dtype=np.float32)
        idx = np.minimum(pos.astype(np.int64), cells - 1)
        return idx, pos - idx

    iy, fy = axis(cells_y)
    ix, fx = axis(cells_x)
    fy, fx = fy[:, None], fx[None, :]
    top = lattice[iy][:, ix] * (1 - fx) + lattice[iy][:, ix + 1] * fx
    bottom = lattice[iy + 1][:, ix] * (1 - fx) + lattice[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _weave(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """Basket weave: cells alternate horizontal and vertical thread pairs; random phase and slight tilt."""
    y, x = _grid(size)
    period = size / rng.uniform(9.0, 11.0)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period + rng.uniform(0, 2)
    horizontal = (np.floor(u) + np.floor(v)) % 2 == 0
    across = np.where(horizontal, v, u)
    along = np.where(horizontal, u, v)
    thread = np.sin(np.pi * ((2 * across) % 1.0)) ** 0.6
    bulge = 0.8 + 0.2 * np.sin(np.pi * (along % 1.0))
    value = 0.3 + 0.7 * thread * bulge
    value *= 1.0 + 0.06 * _smooth_noise(rng, size, 3, 3)
    colour = np.array([0.80, 0.76, 0.66], np.float32) * rng.uniform(0.92, 1.05)
    return value[..., None] * colour, np.ones((size, size), bool)


def _wood(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """Wood grain: wavy vertical rings plus fine streaks, with random phase, waviness and tint."""
    y, x = _grid(size)
    period = size / rng.uniform(7.0, 10.0)
    warp = rng.uniform(0.02, 0.05) * size * np.sin(
        2 * np.pi * y / (size * rng.uniform(0.8, 1.6)) + rng.uniform(0, 6.3)
    ) + 0.06 * size * _smooth_noise(rng, size, 3, 2)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (x + warp) / period + rng.uniform(0, 6.3))
    streaks = _smooth_noise(rng, size, 4, size // 3)
    value = np.clip(rings**2 * 0.8 + 0.12 * streaks + 0.1, 0, 1)[..., None]
    light = np.array([0.84, 0.64, 0.42], np.float32) * rng.uniform(0.94, 1.04)
    dark = np.array([0.52, 0.32, 0.17], np.float32)
    return light * (1 - value) + dark * value, np.ones((size, size), bool)


def _washer(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """A brushed-metal ring with a notch on a dark background; centre, radius and notch angle jitter."""
    y, x = _grid(size)
    cy, cx = size / 2 + rng.normal(0, 0.015 * size, 2)
    dy, dx = y - cy, x - cx
    dist = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    outer = 0.33 * size * rng.uniform(0.98, 1.02)
    inner = 0.14 * size
    notch_angle = -np.pi / 2 + np.deg2rad(rng.normal(0, 5.0))
    notch = (np.abs(np.angle(np.exp(1j * (theta - notch_angle)))) * dist < 0.05 * size) & (
        dist > outer - 0.07 * size
    )
    cover = np.clip(outer - dist + 0.5, 0, 1) * np.clip(dist - inner + 0.5, 0, 1) * (~notch)
    light = np.deg2rad(rng.uniform(-150, -120))
    shade = 0.62 + 0.22 * np.cos(theta - light) + 0.05 * np.sin(2 * np.pi * dist / (0.025 * size))
    metal = np.array([0.74, 0.76, 0.80], np.float32) * shade[..., None]
    vignette = 1.0 - 0.35 * (dist / size)
    background = np.array([0.13, 0.14, 0.17], np.float32) * vignette[..., None]
    img = background * (1 - cover[..., None]) + metal * cover[..., None]
    support = (cover > 0.99) & (dist > inner + 2) & (dist < outer - 2)
    return img.astype(np.float32), support


_RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[Array, Array]]] = {
    "washer": _washer,
    "weave": _weave,
    "wood": _wood,
}


def _blob_radius(rng: np.random.Generator, theta: Array, radius: float) -> Array:
    """An irregular closed outline: ``radius`` modulated by a few random low harmonics of ``theta``."""
    wobble = sum(rng.uniform(0, 0.14) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    return radius * (1 + wobble)


def _defect_alpha(rng: np.random.Generator, kind: str, support: Array) -> Array:
    """Blend weight in [0, 1] of one defect of ``kind`` placed on ``support``."""
    size = support.shape[0]
    margin = int(0.08 * size)
    zone = np.zeros_like(support)
    zone[margin:-margin, margin:-margin] = support[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(zone if zone.any() else support)
    pick = rng.integers(len(ys))
    cy, cx = float(ys[pick]), float(xs[pick])
    y, x = _grid(size)
    if kind == "scratch":
        length = rng.uniform(0.28, 0.45) * size
        direction = rng.uniform(0, np.pi)
        start = np.array([cy, cx]) - 0.5 * length * np.array([np.sin(direction), np.cos(direction)])
        end = start + length * np.array([np.sin(direction), np.cos(direction)])
        normal = np.array([np.cos(direction), -np.sin(direction)])
        bend = normal * rng.uniform(-0.3, 0.3) * length
        start, end = start - bend / 2, end - bend / 2  # keeps the curve's midpoint on the picked pixel
        ctrl = (start + end) / 2 + bend
        t = np.linspace(0, 1, int(length * 3) + 2)[:, None]
        pts = ((1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end).astype(np.float32)
        half_width = max(0.9, size / 110)
        pad = half_width + 2
        y0, x0 = np.maximum(np.floor(pts.min(0) - pad).astype(int), 0)
        y1, x1 = np.minimum(np.ceil(pts.max(0) + pad).astype(int) + 1, size)
        alpha = np.zeros((size, size), np.float32)
        if y1 > y0 and x1 > x0:
            by, bx = y[y0:y1, x0:x1], x[y0:y1, x0:x1]
            d2 = (by[..., None] - pts[:, 0]) ** 2 + (bx[..., None] - pts[:, 1]) ** 2
            alpha[y0:y1, x0:x1] = np.clip(half_width + 0.5 - np.sqrt(d2.min(-1)), 0, 1)
        return alpha
    dist = np.hypot(y - cy, x - cx)
    theta = np.arctan2(y - cy, x - cx)
    if kind == "hole":
        edge = _blob_radius(rng, theta, rng.uniform(0.045, 0.07) * size)
        return np.clip(edge - dist + 0.5, 0, 1)
    edge = _blob_radius(rng, theta, rng.uniform(0.07, 0.1) * size)
    soft = 0.35 * edge
    return rng.uniform(0.6, 0.8) * np.clip((edge - dist) / soft, 0, 1)


def _add_defect(rng: np.random.Generator, img: Array, support: Array, kind: str) -> tuple[Array, Array]:
    """Paint a defect of ``kind`` onto ``img`` (within ``support``); return the image and its exact mask.

    The mask is exactly the set of changed pixels: blend weights below 0.15 are dropped rather than
    left as invisible changes outside the mask. Placements whose area falls outside 0.5-5 % are redrawn.
    """
    size = img.shape[0]
    for _ in range(50):
        alpha = _defect_alpha(rng, kind, support) * support
        alpha[alpha < 0.15] = 0
        area = np.count_nonzero(alpha) / alpha.size
        if _MIN_AREA <= area <= _MAX_AREA:
            break
    mask = alpha > 0
    if kind == "scratch":
        local = float(img[mask].mean()) if mask.any() else 0.5
        colour = np.full(3, 0.97 if local < 0.55 else 0.06, np.float32)
    elif kind == "hole":
        y, x = _grid(size)
        cy, cx = np.argwhere(mask).mean(0)
        rim = np.clip(np.hypot(y - cy, x - cx) / (np.sqrt(mask.sum() / np.pi) + 1e-6), 0, 1)
        colour = (0.03 + 0.1 * rim)[..., None] * np.array([1.0, 0.9, 0.85], np.float32)
    else:
        colour = np.array(_STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))], np.float32)
    a = alpha[..., None]
    return img * (1 - a) + colour * a, mask


def _finish(rng: np.random.Generator, img: Array) -> Array:
    """Apply global exposure jitter and sensor noise, and quantise to uint8 RGB."""
    img = img * rng.uniform(0.95, 1.05) + rng.normal(0, 0.012, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save_png(array: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _rng(seed: int, cls_name: str, split: str, index: int) -> np.random.Generator:
    """Independent stream per image, so any subset of classes renders identical pixels."""
    return np.random.default_rng([seed, zlib.crc32(cls_name.encode()), zlib.crc32(split.encode()), index])


def _render_class(
    root: Path, cls_name: str, size: int, n_train: int, n_good: int, n_bad: int, seed: int
) -> None:
    render = _RENDERERS[cls_name]
    cls_dir = root / cls_name
    for i in range(n_train):
        rng = _rng(seed, cls_name, "train", i)
        _save_png(_finish(rng, render(rng, size)[0]), cls_dir / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        rng = _rng(seed, cls_name, "test_good", i)
        _save_png(_finish(rng, render(rng, size)[0]), cls_dir / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        kind, number = DEFECTS[i % len(DEFECTS)], i // len(DEFECTS)
        rng = _rng(seed, cls_name, f"test_{kind}", number)
        img, support = render(rng, size)
        img, mask = _add_defect(rng, img, support, kind)
        _save_png(_finish(rng, img), cls_dir / "test" / kind / f"{number:03d}.png")
        _save_png(mask.astype(np.uint8) * 255, cls_dir / "ground_truth" / kind / f"{number:03d}_mask.png")


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_demo_dataset(
    root: str | Path,
    image_size: int = 128,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_bad: int = 15,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write the demo data set (MVTec layout plus ``meta.json``) under ``root`` and return ``root``.

    Idempotent: a ``.complete`` marker holding the generation parameters is written last, and a root
    whose marker matches is left untouched; a root without it (an interrupted run) or with other
    parameters has its generated class folders removed and rebuilt. ``n_test_bad`` images are spread
    round-robin over the defect types ``scratch``, ``hole`` and ``stain``.
    """
    root = Path(root)
    names = sorted(DEMO_CLASSES if classes is None else set(classes))
    unknown = [c for c in names if c not in _RENDERERS]
    if unknown or not names:
        raise DataError(f"unknown demo class(es) {unknown}; choose from {', '.join(DEMO_CLASSES)}")
    if image_size < 32:
        raise DataError(f"image_size must be at least 32 for visible defects, got {image_size}")
    if n_train < 1 or n_test_good < 0 or n_test_bad < 0:
        raise DataError("need n_train >= 1 and non-negative test counts")
    params = {
        "format": FORMAT_VERSION,
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_bad": int(n_test_bad),
        "seed": int(seed),
        "classes": names,
    }
    marker = root / MARKER
    previous = _read_marker(marker) if marker.is_file() else None
    if previous == params and (root / "meta.json").is_file():
        return root
    make_folder(root, "data.root")
    marker.unlink(missing_ok=True)
    stale = set(names) | set(previous.get("classes", []) if isinstance(previous, dict) else [])
    for cls_name in sorted(stale & set(DEMO_CLASSES)):
        shutil.rmtree(root / cls_name, ignore_errors=True)
    for cls_name in names:
        _render_class(root, cls_name, image_size, n_train, n_test_good, n_test_bad, seed)
    write_meta(root, select_classes(build_mvtec_meta(root), names))
    tmp = root / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``python -m data.synthetic ROOT [--image-size N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write the data set into")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test-good", type=int, default=15)
    parser.add_argument("--n-test-bad", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=None, choices=DEMO_CLASSES)
    args = parser.parse_args(argv)
    root = generate_demo_dataset(
        args.root, args.image_size, args.n_train, args.n_test_good, args.n_test_bad, args.seed, args.classes
    )
    print(f"demo data set ready in {root}")


if __name__ == "__main__":
    main()
