"""``SynthesizedAD``: ``DefaultAD`` whose training items carry a synthesized anomaly (DeSTSeg).

A training item adds ``augmented_image`` (the image with a texture pasted inside a Perlin mask,
ImageNet-normalised like ``img``) and replaces ``img_mask`` by that mask and ``anomaly`` by
whether it is non-empty; test items are ``DefaultAD``'s. The synthesis of item ``i`` in epoch
``e`` uses the generator :func:`data.synthesis.sample_rng` ``(seed, e, i)``: the trainer tells the
data set its epoch (:meth:`SynthesizedAD.set_epoch`, through shared memory, so persistent loader
workers see it), so a resumed run synthesizes exactly what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.anomaly_source import ANOMALY_SOURCES
from data.default_ad import _SCALE, _SHIFT, IMAGENET_MEAN, IMAGENET_STD, DefaultAD
from data.meta import DataError
from data.synthesis import paste_texture, sample_rng

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


class SynthesizedAD(DefaultAD):
    """``DefaultAD`` plus a synthesized anomaly per training item.

    ``anomaly_source`` is the ``data.anomaly_source`` section: ``type`` (an ``ANOMALY_SOURCES``
    name: ``dtd`` or ``procedural``), ``root`` (the prepared DTD folder) and ``seed`` (derived from
    the run's ``seed``). The other arguments are ``DefaultAD``'s.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        anomaly_source: Mapping[str, Any] | None = None,
        log: Callable[[str], Any] = print,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, split=split, log=log, **kwargs)
        self.source = None
        self.seed = 0
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        if split != "train":
            return
        options = dict(anomaly_source.items()) if anomaly_source is not None else {}
        kind = options.get("type")
        if kind is None:
            raise DataError(
                "data.anomaly_source.type is not set; this method trains on synthesized anomalies: set it "
                "to dtd (data.anomaly_source.root=<prepared DTD folder>) or, for a demo, procedural"
            )
        self.seed = int(options.get("seed") or 0)
        self.source = ANOMALY_SOURCES.build(
            kind, root=options.get("root"), image_size=self.image_size, log=log
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose synthesis the next items draw (called before each epoch's iteration)."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.source is None:
            return super().__getitem__(index)
        img_path, _, cls_name, specie, _ = self.items[index]
        if self.cache is not None:
            rgb, _ = self.cache.get(index)
        else:
            rgb, _ = self._decode(index)
        img = rgb.transpose(2, 0, 1).astype(np.float32, order="C")
        img *= _SCALE
        img -= _SHIFT
        rng = sample_rng(self.seed, int(self._epoch), index)
        texture = self.source.texture(rng)
        augmented, mask = paste_texture(rgb.astype(np.float32) / 255.0, texture, rng)
        augmented = ((augmented - _MEAN) / _STD).transpose(2, 0, 1)
        return {
            "img": torch.from_numpy(img),
            "augmented_image": torch.from_numpy(np.ascontiguousarray(augmented, dtype=np.float32)),
            "img_mask": torch.from_numpy(mask[None].copy()),
            "cls_name": cls_name,
            "specie_name": specie,
            "anomaly": int(mask.any()),
            "img_path": img_path,
        }
