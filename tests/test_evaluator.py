"""The evaluator scores each class on exactly its own images and averages classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluator import ADEvaluator
from util.metrics import METRIC_NAMES, compute_metrics


def _batch(rng: np.random.Generator, n: int, cls_names: list[str]) -> tuple:
    masks = np.zeros((n, 1, 16, 16), np.float32)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, 12, 2)
        masks[i, 0, y : y + 4, x : x + 4] = 1
    maps = rng.random((n, 16, 16)).astype(np.float32) + masks[:, 0] * rng.random()
    scores = maps.reshape(n, -1).max(1)
    return (
        torch.from_numpy(maps),
        torch.from_numpy(scores),
        torch.from_numpy(masks),
        torch.from_numpy(labels),
        cls_names,
    )


def test_per_class_metrics_match_direct_computation_over_batches() -> None:
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 6, ["a", "b", "a", "b", "a", "b"]), _batch(rng, 4, ["b", "a", "b", "b"])]
    ev = ADEvaluator()
    for batch in batches:
        ev.update(*batch)
    results = ev.compute()
    assert set(results) == {"a", "b", "mean"} and ev.num_samples == 10
    for cls in ("a", "b"):
        sel = [np.array([c == cls for c in b[4]]) for b in batches]
        maps = np.concatenate([b[0].numpy()[s] for b, s in zip(batches, sel, strict=True)])
        masks = np.concatenate([b[2].numpy()[s] for b, s in zip(batches, sel, strict=True)])[:, 0] > 0.5
        labels = np.concatenate([b[3].numpy()[s] for b, s in zip(batches, sel, strict=True)])
        expected = compute_metrics(maps, masks, labels)
        for name in METRIC_NAMES:
            assert results[cls][name] == pytest.approx(expected[name], abs=1e-9)
        assert results[cls]["mAD"] == pytest.approx(np.mean([expected[m] for m in METRIC_NAMES]))
    for name in METRIC_NAMES:
        assert results["mean"][name] == pytest.approx((results["a"][name] + results["b"][name]) / 2)
    ev.reset()
    with pytest.raises(RuntimeError, match="no test samples"):
        ev.compute()
