"""Anomaly synthesis for methods trained on pasted defects (DeSTSeg; DRAEM-style methods).

As in the authors' code (ADer ``data/ad_dataset.py``, class ``DeSTSeg``): a 2-D Perlin noise with
``2**a x 2**b`` gradient cells (``a, b`` uniform in 0..5), rotated by a uniform angle in
[-90, 90] degrees (bilinear, zero outside), thresholded at 0.5, gives the defect mask; inside it
the image is replaced by ``(1 - beta) * texture + beta * image`` with ``beta`` uniform in
[0, 0.8). Every draw comes from the ``numpy.random.Generator`` passed in, so one generator seeded
per sample (:func:`sample_rng`) makes the synthesis independent of worker processes and of where a
run was resumed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

PERLIN_MAX_SCALE = 6  # exclusive bound of the exponent of the cells per side (authors: 6)
THRESHOLD = 0.5
MAX_BETA = 0.8


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one training sample: a function of the run's seed, the epoch and the
    sample's index only."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """2-D Perlin noise ``[H, W]`` (float64) with ``cells`` gradient cells along each axis.

    Random unit gradients sit on the ``(cells + 1)`` lattice; each pixel blends the dot products of
    its cell's four corner gradients with its offsets by the quintic fade, scaled by sqrt(2). A
    side that ``cells`` does not divide is computed on the next multiple and cropped.
    """
    h, w = shape
    ry, rx = cells
    dy, dx = -(-h // ry), -(-w // rx)  # pixels per cell, rounded up
    angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    gy = (np.arange(ry * dy) / dy) % 1  # position inside the cell along each axis
    gx = (np.arange(rx * dx) / dx) % 1
    grid = np.stack(np.meshgrid(gy, gx, indexing="ij"), axis=-1)

    def corner(oy: int, ox: int) -> np.ndarray:
        g = grads[oy : oy + ry, ox : ox + rx].repeat(dy, axis=0).repeat(dx, axis=1)
        return ((grid - (oy, ox)) * g).sum(axis=-1)

    t = _fade(grid)
    n0 = corner(0, 0) + t[..., 0] * (corner(1, 0) - corner(0, 0))
    n1 = corner(0, 1) + t[..., 0] * (corner(1, 1) - corner(0, 1))
    return (math.sqrt(2) * (n0 + t[..., 1] * (n1 - n0)))[:h, :w]


def anomaly_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A float32 0/1 defect mask ``[H, W]``: rotated Perlin noise above :data:`THRESHOLD`."""
    cells = (2 ** int(rng.integers(0, PERLIN_MAX_SCALE)), 2 ** int(rng.integers(0, PERLIN_MAX_SCALE)))
    noise = perlin_noise(rng, shape, cells)
    angle = float(rng.uniform(-90.0, 90.0))
    noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
    return (noise > THRESHOLD).astype(np.float32)


def paste_texture(
    image: np.ndarray, texture: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(augmented image, mask)``: ``image`` and ``texture`` are float32 ``[H, W, 3]`` in [0, 1];
    inside the drawn mask the result is ``(1 - beta) * texture + beta * image``."""
    mask = anomaly_mask(rng, image.shape[:2])[..., None]
    beta = float(rng.uniform(0.0, MAX_BETA))
    augmented = image * (1 - mask) + (1 - beta) * texture * mask + beta * image * mask
    return augmented.astype(np.float32), mask[..., 0]
