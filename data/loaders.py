"""Data loaders of a run: the configured data set per split, sharded over ``torchrun`` ranks."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from data import DATASETS
from util.config import BaseConfig
from util.distributed import DistContext, EpochShardSampler, ShardSampler, barrier

OPTIONAL_DATASET_KEYS = (
    "cache",
    "cache_dir",
    "views",
    "allow_absolute_paths",
    "validation",
    "layout",
    "anomaly_source",
)


def build_loaders(
    cfg: BaseConfig, dist: DistContext, micro_batch: int, log: logging.Logger, train: bool = True
) -> tuple[DataLoader | None, DataLoader]:
    """``(train_loader or None, test_loader)`` for this rank.

    The demo data set is generated first when ``data.synthetic`` is set. Training draws a
    per-epoch permutation (seed + epoch) split over the ranks, ``micro_batch`` images a step;
    testing shards the set without padding, ``data.batch_size_test`` images a step over all ranks.
    """
    d = cfg.data
    if getattr(d, "synthetic", False):
        from data.synthetic import MARKER, generate_demo_dataset

        if dist.is_main:
            if not (Path(d.root) / MARKER).is_file():
                log.info("generating the demo data set into %s (first run only)", d.root)
            generate_demo_dataset(d.root, **dict(d.synthetic_args.items()))
        barrier(dist)
    splits = ("train", "test") if train else ("test",)
    loaders = {split: _loader(cfg, split, dist, micro_batch, log) for split in splits}
    return loaders.get("train"), loaders["test"]


def _loader(
    cfg: BaseConfig, split: str, dist: DistContext, micro_batch: int, log: logging.Logger
) -> DataLoader:
    d = cfg.data
    dataset = DATASETS.build(
        d.type,
        root=d.root,
        split=split,
        cls_names=d.cls_names,
        image_size=d.image_size,
        meta_file=d.meta_file,
        log=log.info,
        # optional dataset features are passed only when set, so data sets without them still build
        **{k: getattr(d, k) for k in OPTIONAL_DATASET_KEYS if getattr(d, k, None) not in (None, False)},
    )
    log.info("%s set: %d images, classes: %s", split, len(dataset), ", ".join(dataset.cls_names))
    rank, world = dist.rank, dist.world_size
    if split == "train":
        batch = micro_batch
        sampler: Any = EpochShardSampler(len(dataset), cfg.seed, rank, world)
        drop_last = len(sampler) > batch
    else:
        batch = max(1, math.ceil(d.batch_size_test / world))
        sampler, drop_last = ShardSampler(len(dataset), rank, world), False
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=d.num_workers,
        pin_memory=dist.device.type == "cuda",
        # a loader of its own draws worker seeds, so iterating it leaves the global RNG alone
        generator=torch.Generator().manual_seed(cfg.seed + rank),
        persistent_workers=d.num_workers > 0,
    )
