"""Score a test set on every rank and hand the maps to the evaluator on rank 0.

Each rank predicts its shard (:class:`util.distributed.ShardSampler`); maps, scores, masks,
labels and dataset indices are gathered on rank 0 batch by batch (no padding reaches the
evaluator), which checks that every image came exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from util.distributed import DistContext, all_gather_padded, any_rank, gather_objects, steps_for_all
from util.progress import Progress

Predict = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# what a batch may say about its images besides the pixels: passed to the evaluator when present
# (``group``: MVTec LOCO AD's anomaly kind; ``split``: "validation" for a held-out validation image)
_OPTIONAL_INFO = {"group": "groups", "split": "splits"}
INFO_KEYS = ("cls_name", "img_path", "sample_id", *_OPTIONAL_INFO)


def _empty(size: tuple[int, int], device: torch.device, side: torch.device) -> tuple[Any, ...]:
    """What a rank whose shard is exhausted contributes to a gather: nothing, in the right shapes."""
    return (
        torch.zeros((0, *size), device=device),
        torch.zeros(0, device=device),
        torch.zeros((0, *size), dtype=torch.bool, device=side),
        torch.zeros(0, dtype=torch.long, device=side),
        torch.zeros(0, dtype=torch.long, device=side),
        {},
    )


def score_test_set(
    predict: Predict,
    loader: torch.utils.data.DataLoader,
    evaluator: Any,
    dist: DistContext,
    size: tuple[int, int],
    log: Callable[[str], None],
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    stop_requested: Callable[[], bool] = lambda: False,
    on_stop: Callable[[], None] = lambda: None,
) -> int | None:
    """Predict every test image once over all ranks and feed rank 0's ``evaluator``.

    ``predict(images) -> (maps [B, H, W], scores [B])`` runs on ``dist.device`` inside
    ``precision()``. After each step's gather, if ``stop_requested()`` on any rank, every rank
    calls ``on_stop()`` (which raises). Returns the number of images scored on rank 0, None on
    the others; raises ``RuntimeError`` if the shards did not cover the set exactly once.
    """
    device = dist.device
    shard = loader.sampler.indices
    steps = steps_for_all(len(loader.dataset), loader.batch_size, dist.world_size)
    batches = iter(loader)
    seen: list[int] = []
    # masks, labels and indices stay on the host unless a collective needs them on the device
    side = device if dist.distributed else torch.device("cpu")
    for step in Progress(range(steps), "test", log, enabled=dist.is_main):
        batch = next(batches, None)
        if batch is None:
            maps, scores, masks, labels, index, info = _empty(size, device, side)
        else:
            imgs = batch["img"].to(device, non_blocking=True)
            with precision():
                maps, scores = predict(imgs)
            masks = batch["img_mask"].reshape(maps.shape).to(side) > 0.5
            labels = torch.as_tensor(batch["anomaly"], device=side)
            start = step * loader.batch_size
            index = torch.as_tensor(shard[start : start + maps.shape[0]], device=side)
            info = {k: list(batch[k]) for k in INFO_KEYS if k in batch}
        parts = [
            all_gather_padded(x, loader.batch_size, dist)
            for x in (maps, scores, masks.to(torch.uint8), labels, index)
        ]
        infos = gather_objects(info, dist)
        if any_rank([stop_requested()], dist)[0]:
            on_stop()
        if not dist.is_main:
            continue
        for r_maps, r_scores, r_masks, r_labels, r_index, r_info in zip(*parts, infos, strict=True):
            if not len(r_index):
                continue
            seen.extend(r_index.tolist())
            evaluator.update(
                r_maps.cpu(),
                r_scores.cpu(),
                r_masks.cpu().bool(),
                r_labels.cpu(),
                r_info["cls_name"],
                sample_ids=r_info.get("sample_id"),
                img_paths=r_info.get("img_path"),
                **{key: r_info[name] for name, key in _OPTIONAL_INFO.items() if name in r_info},
            )
    if not dist.is_main:
        return None
    if sorted(seen) != list(range(len(loader.dataset))):
        raise RuntimeError(
            f"evaluation covered {len(set(seen))} distinct of {len(loader.dataset)} test images "
            f"({len(seen)} in total); this is a bug in the evaluation sharding"
        )
    return len(seen)
