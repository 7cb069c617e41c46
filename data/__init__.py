"""Datasets: the ``DATASETS`` registry and the readers of the meta.json interchange format."""

from collections.abc import Sequence

from util.registry import Registry

DATASETS = Registry("dataset")
DATASETS.register_lazy("DefaultAD", "data.default_ad:DefaultAD")
DATASETS.register_lazy("SynthesizedAD", "data.synthesized:SynthesizedAD")


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``data.image_size`` (one side, or ``[height, width]``) as ``(height, width)``.

    The one place that reads the config's two spellings of an input size, so that every reader
    (data loading, evaluation, prediction, FLOP counts) agrees on non-square sizes.
    """
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)
