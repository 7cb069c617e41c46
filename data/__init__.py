"""Datasets: the ``DATASETS`` registry and the readers of the meta.json interchange format."""

from util.registry import Registry

DATASETS = Registry("dataset")
DATASETS.register_lazy("DefaultAD", "data.default_ad:DefaultAD")
