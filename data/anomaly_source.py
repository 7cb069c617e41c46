"""Texture sources for synthesized anomalies: the ``ANOMALY_SOURCES`` registry.

``dtd`` reads the Describable Textures Dataset (the authors' source: every ``images/<category>/*.jpg``)
through the ``textures.json`` that ``tools/prepare_data.py --dataset dtd`` writes into its root;
``procedural`` draws smooth random textures (colour gratings and blurred noise) and needs no
download: it is for the demo config and the tests, never a stand-in for DTD. A source's
``texture(rng)`` returns one float32 ``[H, W, 3]`` texture in [0, 1] at the images' size, drawn
with the sample's generator.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from data import as_hw
from data.meta import DataError, read_json, write_meta
from util.progress import Progress
from util.registry import Registry

ANOMALY_SOURCES = Registry("anomaly source")
DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
TEXTURES_FILE = "textures.json"
_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _stderr_line(fmt: str, *args: Any) -> None:
    print(fmt % args, file=sys.stderr, flush=True)


class MissingAnomalySourceError(DataError):
    """The configured texture source is not on disk (or not prepared)."""


def missing_dtd(root: str | Path, why: str) -> MissingAnomalySourceError:
    """The one-paragraph error of a DTD copy that cannot be used."""
    return MissingAnomalySourceError(
        f"data.anomaly_source.root={root}: {why}. This method pastes textures of the Describable Textures "
        f"Dataset into normal images while training. Download it from {DTD_URL}, unpack it (it holds "
        f"dtd/images/<category>/*.jpg), run python tools/prepare_data.py --dataset dtd --root <that dtd "
        f"folder>, and set data.anomaly_source.root to that folder"
    )


def texture_files(root: Path) -> list[str]:
    """The DTD images under ``root/images/<category>/``, relative to ``root``, sorted."""
    images = root / "images"
    found = [
        f"images/{category.name}/{f.name}"
        for category in sorted(p for p in images.iterdir() if p.is_dir())
        for f in sorted(category.iterdir())
        if f.suffix.lower() in _EXTENSIONS and f.is_file()
    ]
    return found


def prepare_dtd(root: str | Path, check: bool = False, progress: bool = True) -> tuple[Path, int, list[str]]:
    """Find DTD's images under ``root`` and write ``root/textures.json`` listing them (``check``:
    only read the existing list). Returns the file, the number of textures and the problems (files
    missing or unreadable, an empty copy), each with its fix; every listed file is opened."""
    root = Path(root)
    path = root / TEXTURES_FILE
    if check:
        if not path.is_file():
            raise missing_dtd(root, f"{path} not found (run without --check to create it)")
        files = read_json(path, "run tools/prepare_data.py --dataset dtd without --check to rebuild it")[
            "textures"
        ]
    else:
        if not (root / "images").is_dir():
            raise missing_dtd(root, f"{root / 'images'} is not a folder")
        files = texture_files(root)
        if not files:
            raise missing_dtd(root, f"no .jpg/.png files in the category folders of {root / 'images'}")
        write_meta(root, {"textures": files}, TEXTURES_FILE)  # atomic: no partial file is left
    problems = []
    for rel in Progress(files, "checking textures", _stderr_line, enabled=progress, every_s=30):
        try:
            with Image.open(root / rel) as im:
                im.load()
        except FileNotFoundError:
            problems.append(
                f"{root / rel} is listed in {path} but missing: restore it or rerun without --check"
            )
        except Exception as err:  # PIL reports damaged files with many exception types
            problems.append(f"{root / rel} cannot be read ({type(err).__name__}); re-download DTD")
    return path, len(files), problems


class DTDSource:
    """Textures from a prepared DTD copy: a uniformly drawn file, RGB, resized to the image size
    (the authors resize the whole texture, bilinearly, with no other augmentation)."""

    def __init__(
        self, root: str | Path | None, image_size: int | tuple[int, int], log: Callable[[str], Any] = print
    ):
        if not root:
            raise missing_dtd(root, "no DTD folder is configured")
        self.root = Path(root)
        path = self.root / TEXTURES_FILE
        if not path.is_file():
            why = (
                "the folder does not exist" if not self.root.is_dir() else f"{path} not found (not prepared)"
            )
            raise missing_dtd(self.root, why)
        self.files = [
            str(self.root / f)
            for f in read_json(path, "rerun tools/prepare_data.py --dataset dtd")["textures"]
        ]
        if not self.files:
            raise missing_dtd(self.root, f"{path} lists no textures")
        self.size = as_hw(image_size)
        log(f"anomaly source: {len(self.files)} DTD textures from {self.root}")

    def texture(self, rng: np.random.Generator) -> np.ndarray:
        """One texture, float32 ``[H, W, 3]`` in [0, 1]."""
        path = self.files[int(rng.integers(len(self.files)))]
        h, w = self.size
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        except OSError as err:
            raise missing_dtd(self.root, f"texture {path} cannot be read ({err})") from err
        return np.asarray(rgb, dtype=np.float32) / 255.0


class ProceduralSource:
    """Random smooth textures without a download: per channel, a few oriented sine gratings plus
    Gaussian-blurred noise, rescaled to [0, 1]. For demos and tests only (logged when built)."""

    def __init__(
        self, root: Any = None, image_size: int | tuple[int, int] = 256, log: Callable[[str], Any] = print
    ):
        self.size = as_hw(image_size)
        log(
            "anomaly source: PROCEDURAL textures (no DTD), for demos and tests; the paper's numbers need "
            "data.anomaly_source.type=dtd"
        )

    def texture(self, rng: np.random.Generator) -> np.ndarray:
        """One texture, float32 ``[H, W, 3]`` in [0, 1]."""
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        out = np.empty((h, w, 3), np.float32)
        for c in range(3):
            layer = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=rng.uniform(1.0, 4.0))
            layer /= layer.std() + 1e-8
            for _ in range(3):
                angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 24), rng.uniform(0, 2 * np.pi)
                layer += rng.uniform(0.5, 2.0) * np.sin(
                    2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase
                )
            lo, hi = layer.min(), layer.max()
            out[..., c] = (layer - lo) / (hi - lo + 1e-8)
        return out


ANOMALY_SOURCES.register("dtd")(DTDSource)
ANOMALY_SOURCES.register("procedural")(ProceduralSource)
