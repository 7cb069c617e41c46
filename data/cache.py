"""Decoded-image cache: every image of a split decoded and resized once, kept as uint8 arrays.

Decoding JPEGs dominates data loading on CPU, and the resized images of a split never change between
epochs, so :class:`ImageCache` decodes them once (in the main process, with a few threads) into

* ``images``: uint8 ``[N, H, W, 3]`` RGB at the configured size, and
* ``masks``: uint8 ``[N, H, W]`` of 0/1 (only when the split has masks),

held in RAM (``"memory"``) or stored as ``.npy`` files that are memory-mapped (``"npy"``). An npy cache
is keyed by a hash of the meta file's bytes, the split, the selected items and the image size, so it
is rebuilt when any of them changes. Files are written under temporary names and renamed; a JSON
manifest written last records each file's size and CRC-32, so a partial or corrupted cache is detected
when opened and rebuilt. Images edited in place (same path) are not detected: delete the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from data.meta import DataError
from util.errors import make_folder

CACHE_MODES = ("memory", "npy")
CACHE_VERSION = 2  # 2: images and masks turned upright by their EXIF orientation
Decoded = tuple[np.ndarray, np.ndarray | None]  # RGB uint8 [H, W, 3], bool mask [H, W] or None


def cache_key(meta_bytes: bytes, split: str, paths: Sequence[tuple[str, str]], size: tuple[int, int]) -> str:
    """Hex digest identifying one cache: format version, meta file content, split, items and size."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, split, list(size)]).encode())
    h.update(hashlib.sha256(meta_bytes).digest())
    for img, mask in paths:
        h.update(f"{img}\0{mask}\n".encode())
    return h.hexdigest()


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fill(
    decode: Callable[[int], Decoded],
    images: np.ndarray,
    masks: np.ndarray | None,
    mode: str,
    log: Callable[[str], Any],
    workers: int | None,
) -> None:
    """Decode every item into ``images`` (and ``masks``) with a few threads (Pillow releases the GIL)."""

    def one(i: int) -> None:
        rgb, mask = decode(i)
        images[i] = rgb
        if masks is not None and mask is not None:
            masks[i] = mask

    count, h, w = images.shape[:3]
    log(f"decoding {count} images into the {mode} cache ({h}x{w})")
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(one, range(count)):
            pass


class ImageCache:
    """The decoded images (and masks) of one split, in memory or memory-mapped from ``.npy`` files.

    Use :meth:`build` to get one; with ``mode="npy"`` a valid cache on disk is opened instead of
    decoding again. Pickling (DataLoader workers under spawn/forkserver) sends only the file paths of
    an npy cache, which each worker maps again; a memory cache is copied into each such worker, while
    forked workers share its pages.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray | None, files: tuple[Path, Path | None] | None):
        self.images = images
        self.masks = masks
        self._files = files

    def __getstate__(self) -> dict[str, Any]:
        if self._files is None:
            return self.__dict__.copy()
        return {"images": None, "masks": None, "_files": self._files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.images is None and self._files is not None:
            img_file, mask_file = self._files
            self.images = np.load(img_file, mmap_mode="r")
            self.masks = np.load(mask_file, mmap_mode="r") if mask_file is not None else None

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 ``[H, W, 3]`` and the 0/1 uint8 mask ``[H, W]`` (None when the split has no masks)."""
        return self.images[index], None if self.masks is None else self.masks[index]

    @classmethod
    def build(
        cls,
        mode: str,
        decode: Callable[[int], Decoded],
        count: int,
        size: tuple[int, int],
        has_masks: bool,
        key: str = "",
        cache_dir: Path | None = None,
        name: str = "",
        log: Callable[[str], Any] = print,
        workers: int | None = None,
    ) -> ImageCache:
        """Open the cache ``name`` in ``cache_dir`` if valid for ``key``, else decode ``count`` items.

        ``decode(i)`` returns item ``i`` resized to ``size`` (H, W); its errors (DataError) propagate.
        """
        if mode not in CACHE_MODES:
            raise DataError(f"data.cache must be None, 'memory' or 'npy', got {mode!r}")
        if mode == "npy":
            if cache_dir is None:
                raise DataError("an npy cache needs a cache folder")
            opened = cls._open(cache_dir, name, key, count, size, has_masks, log)
            if opened is not None:
                return opened
        if mode == "memory":
            images = np.empty((count, *size, 3), np.uint8)
            masks = np.zeros((count, *size), np.uint8) if has_masks else None
            _fill(decode, images, masks, mode, log, workers)
            return cls(images, masks, None)
        return cls._write(cache_dir, name, key, decode, count, size, has_masks, log, workers)

    @staticmethod
    def _paths(cache_dir: Path, name: str) -> tuple[Path, Path, Path]:
        return cache_dir / f"{name}.images.npy", cache_dir / f"{name}.masks.npy", cache_dir / f"{name}.json"

    @classmethod
    def _write(
        cls,
        cache_dir: Path,
        name: str,
        key: str,
        decode: Callable[[int], Decoded],
        count: int,
        size: tuple[int, int],
        has_masks: bool,
        log: Callable[[str], Any],
        workers: int | None,
    ) -> ImageCache:
        """Decode straight into temporary memory-mapped files (RAM use stays small), then commit them."""
        img_file, mask_file, manifest = cls._paths(cache_dir, name)
        make_folder(cache_dir, "data.cache_dir")
        manifest.unlink(missing_ok=True)  # the manifest is the commit marker: remove it before any file
        targets = [(img_file, (count, *size, 3))] + ([(mask_file, (count, *size))] if has_masks else [])
        tmps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path, _ in targets]
        arrays = [
            np.lib.format.open_memmap(t, mode="w+", dtype=np.uint8, shape=sh)
            for t, (_, sh) in zip(tmps, targets)
        ]
        try:
            _fill(decode, arrays[0], arrays[1] if has_masks else None, "npy", log, workers)
            for arr in arrays:
                arr.flush()
        except BaseException:
            del arrays
            for t in tmps:
                t.unlink(missing_ok=True)
            raise
        del arrays
        files = {}
        for tmp, (path, _) in zip(tmps, targets):
            os.replace(tmp, path)
            files[path.name] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
        if not has_masks:
            mask_file.unlink(missing_ok=True)
        tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "files": files}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, manifest)
        log(f"wrote the decoded-image cache {img_file}")
        return cls._mapped(img_file, mask_file if has_masks else None)

    @classmethod
    def _mapped(cls, img_file: Path, mask_file: Path | None) -> ImageCache:
        cache = cls.__new__(cls)
        cache.__setstate__({"images": None, "masks": None, "_files": (img_file, mask_file)})
        return cache

    @classmethod
    def _open(
        cls,
        cache_dir: Path,
        name: str,
        key: str,
        count: int,
        size: tuple[int, int],
        has_masks: bool,
        log: Callable[[str], Any],
    ) -> ImageCache | None:
        """The cache on disk if its manifest matches ``key`` and every file checks out, else None."""
        img_file, mask_file, manifest = cls._paths(cache_dir, name)
        if not manifest.is_file():
            return None
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
            if info.get("key") != key:
                log(f"decoded-image cache {manifest} is stale (data or image size changed); rebuilding")
                return None
            wanted = [(img_file, (count, *size, 3))] + ([(mask_file, (count, *size))] if has_masks else [])
            for path, shape in wanted:
                rec = info["files"][path.name]
                if path.stat().st_size != rec["bytes"] or _crc32(path) != rec["crc32"]:
                    raise ValueError(f"{path} does not match its size or checksum")
                arr = np.load(path, mmap_mode="r")
                if arr.shape != shape or arr.dtype != np.uint8:
                    raise ValueError(f"{path} holds {arr.dtype}{arr.shape}, expected uint8{shape}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log(f"decoded-image cache {manifest} is damaged ({err}); rebuilding")
            return None
        return cls._mapped(img_file, mask_file if has_masks else None)
