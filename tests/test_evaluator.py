"""The streaming evaluator scores each class on exactly its own images and averages classes."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import evaluation.metrics
from evaluation.evaluator import ADEvaluator, sample_metrics
from evaluation.metrics import compute_metrics
from evaluation.metrics_ader import compute_metrics_ader
from evaluation.metrics_exact import METRIC_NAMES, SAMPLE_METRIC_NAMES
from evaluation.metrics_torch import compute_metrics_torch
from evaluation.report import format_table


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


def _batches() -> list[tuple]:
    rng = np.random.default_rng(0)
    return [
        _batch(rng, 6, ["a", "b", "a", "b", "a", "b"]),
        _batch(rng, 4, ["b", "a", "b", "b"]),
        _batch(rng, 5, ["a", "a", "b", "a", "b"]),
    ]


def _class_data(batches: list[tuple], cls: str) -> tuple[np.ndarray, ...]:
    sel = [np.array([c == cls for c in b[4]]) for b in batches]
    pick = [(b, s) for b, s in zip(batches, sel, strict=True)]
    maps = np.concatenate([b[0].numpy()[s] for b, s in pick])
    masks = np.concatenate([b[2].numpy()[s] for b, s in pick])[:, 0] > 0.5
    labels = np.concatenate([b[3].numpy()[s] for b, s in pick])
    return maps, masks, labels


@pytest.mark.parametrize("map_dtype", ["float32", "float16"])
def test_per_class_metrics_match_direct_computation(map_dtype: str) -> None:
    batches = _batches()
    ev = ADEvaluator(map_dtype=map_dtype)
    for batch in batches:
        ev.update(*batch)
    results = ev.compute()
    assert set(results) == {"a", "b", "mean"} and ev.num_samples == 15
    for cls in ("a", "b"):
        maps, masks, labels = _class_data(batches, cls)
        # float16 storage: the metrics are exact for the stored (rounded) maps
        expected = compute_metrics(maps.astype(map_dtype), masks, labels, scores=maps.max(axis=(1, 2)))
        for name in METRIC_NAMES:
            assert results[cls][name] == pytest.approx(expected[name], abs=1e-12), name
        assert results[cls]["mAD"] == pytest.approx(np.mean([expected[m] for m in METRIC_NAMES]))
    for name in METRIC_NAMES:
        assert results["mean"][name] == pytest.approx((results["a"][name] + results["b"][name]) / 2)
    ev.reset()
    with pytest.raises(RuntimeError, match="no test samples"):
        ev.compute()


def test_spilled_maps_give_the_same_results_and_are_removed(tmp_path) -> None:
    batches = _batches()
    in_ram, spilled = ADEvaluator(), ADEvaluator(spill_dir=str(tmp_path / "spill"), spill_mb=0.001)
    for batch in batches:
        in_ram.update(*batch)
        spilled.update(*batch)
    assert list((tmp_path / "spill").rglob("*.maps"))
    assert spilled.compute() == in_ram.compute()
    spilled.reset()
    assert not list((tmp_path / "spill").rglob("*.maps"))


def test_ader_mode_uses_the_ader_functions() -> None:
    batches = _batches()
    ev = ADEvaluator(mode="ader", map_dtype="float32")
    for batch in batches:
        ev.update(*batch)
    results = ev.compute()
    maps, masks, labels = _class_data(batches, "a")
    expected = compute_metrics_ader(maps, masks, labels, scores=maps.max(axis=(1, 2)))
    for name in METRIC_NAMES:
        assert results["a"][name] == pytest.approx(expected[name], abs=1e-12), name


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """Messages the evaluator logs at WARNING, caught on its own logger (its parent may not propagate)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("mambaad.evaluator")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_mambaad_mode_takes_labels_from_masks_and_says_so() -> None:
    batches = _batches()
    ev = ADEvaluator(mode="mambaad", map_dtype="float32")
    maps, scores, masks, labels, names = batches[0]
    labels = labels.clone()
    labels[0] = 1  # its mask is empty: the authors' evaluator counts it as normal
    with _warnings() as messages:
        ev.update(maps, scores, masks, labels, names)
        for batch in batches[1:]:
            ev.update(*batch)
        results = ev.compute()
    a_maps, a_masks, _ = _class_data(batches, "a")
    expected = compute_metrics(
        a_maps, a_masks, np.zeros(len(a_maps)), scores=a_maps.max((1, 2)), mode="mambaad"
    )
    for name in METRIC_NAMES:
        assert results["a"][name] == pytest.approx(expected[name], abs=1e-12), name
    assert messages == [
        "class a: 1 image(s) labelled anomalous have an empty mask and 0 labelled normal have mask "
        "pixels; evaluator.mode=mambaad takes the label from the mask, as the MambaAD authors' "
        "evaluator did"
    ]


@pytest.mark.parametrize("mode", ["exact", "ader", "mambaad"])
def test_a_class_without_anomalies_is_undefined_and_warned_about(mode: str) -> None:
    rng = np.random.default_rng(4)
    ev = ADEvaluator(mode=mode, map_dtype="float32")
    for batch in _batches():
        ev.update(*batch)
    maps = torch.from_numpy(rng.random((3, 16, 16)).astype(np.float32))
    ev.update(maps, maps.flatten(1).amax(1), torch.zeros(3, 1, 16, 16), torch.zeros(3), ["washer"] * 3)
    with _warnings() as messages:
        results = ev.compute()
    washer = results["washer"]
    assert all(math.isnan(washer[m]) for m in METRIC_NAMES) and math.isnan(washer["mAD"])
    assert messages[0] == (
        "class washer: I-AUROC, I-AP, I-F1max undefined (washer has no anomalous test image); reported "
        "as n/a (null in metrics.json) and left out of the mean over classes"
    )
    assert messages[1].startswith("class washer: P-AUROC, P-AP, P-F1max, AUPRO undefined (washer has no ")
    assert len(messages) == 2
    assert ev.undefined["washer"]["AUPRO"] == "has no anomalous pixel"
    assert results["mean"]["I-AUROC"] == pytest.approx(
        (results["a"]["I-AUROC"] + results["b"]["I-AUROC"]) / 2
    )
    per_class = {k: v for k, v in results.items() if k != "mean"}
    notes = format_table(per_class, ev.undefined).splitlines()[-3:]
    assert notes[:2] == [
        "* mean of I-AUROC, I-AP, I-F1max over 2 of 3 classes (washer has no anomalous test image)",
        "* mean of P-AUROC, P-AP, P-F1max, AUPRO over 2 of 3 classes (washer has no anomalous pixel)",
    ]
    assert notes[2].startswith("* mAD is n/a for washer")


def test_sample_level_metrics_take_the_max_over_views() -> None:
    rng = np.random.default_rng(3)
    n_samples, views = 12, 5
    batches, ids = [], []
    for s in range(0, n_samples * views, 10):
        maps, scores, masks, _, names = _batch(rng, 10, ["x"] * 10)
        sample = [(s + j) // views for j in range(10)]
        # one anomalous view in every third sample: the sample label is the max over its views
        labels = torch.tensor([int(k % 3 == 0 and (s + j) % views == 2) for j, k in enumerate(sample)])
        batches.append((maps, scores, masks, labels, names))
        ids.append([f"S{k:03d}" for k in sample])
    ev = ADEvaluator(map_dtype="float32")
    for batch, sample_ids in zip(batches, ids, strict=True):
        ev.update(*batch, sample_ids=sample_ids)
    row = ev.compute()["x"]
    scores = np.concatenate([b[1].numpy() for b in batches]).reshape(n_samples, views).max(1)
    labels = np.concatenate([b[3].numpy() for b in batches]).reshape(n_samples, views).max(1)
    assert row["S-AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert row["S-AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert list(row)[len(METRIC_NAMES)] == "mAD"  # sample metrics follow mAD and are not part of it
    assert row["mAD"] == pytest.approx(np.mean([row[m] for m in METRIC_NAMES]))
    table = format_table({"x": row})
    assert all(name in table.splitlines()[0] for name in SAMPLE_METRIC_NAMES)
    direct = sample_metrics(np.array([0.1, 0.9, 0.2, 0.3]), np.array([0, 1, 0, 0]), ["p", "p", "q", "q"])
    assert direct["S-AUROC"] == 1.0 and direct["S-F1max"] == 1.0


def test_bad_options_and_inputs_are_reported() -> None:
    with pytest.raises(ValueError, match=r"evaluator\.mode"):
        ADEvaluator(mode="fast")
    with pytest.raises(ValueError, match=r"evaluator\.map_dtype"):
        ADEvaluator(map_dtype="int8")
    ev = ADEvaluator()
    maps, scores, masks, labels, names = _batch(np.random.default_rng(0), 4, ["a"] * 4)
    with pytest.raises(ValueError, match="float32"):
        ev.update(maps * 1e6, scores, masks, labels, names)
    with pytest.raises(ValueError, match="sample_ids has 3 entries"):
        ev.update(maps, scores, masks, labels, names, sample_ids=["1", "2", "3"])
    ev.update(maps, scores, masks, labels, names)
    with pytest.raises(ValueError, match="share a size"):
        ev.update(maps[:, :8, :8], scores, masks[:, :, :8, :8], labels, names)


def test_masks_are_stored_packed_and_only_for_anomalous_images() -> None:
    batches = _batches()
    ev = ADEvaluator()
    for batch in batches:
        ev.update(*batch)
    store = ev._stores["a"]
    _, masks, _ = _class_data(batches, "a")
    assert np.array_equal(store.masks(), masks)
    assert len(store.mask_bits) == int(masks.reshape(len(masks), -1).any(1).sum())
    assert all(bits.dtype == np.uint8 and bits.size == 16 * 16 // 8 for bits in store.mask_bits.values())
    assert store.maps().dtype == np.float16 and not math.isnan(float(store.maps().max()))


@pytest.mark.parametrize("spill", [False, True])
def test_torch_metric_path_gives_the_numpy_numbers(tmp_path, monkeypatch, spill: bool) -> None:
    monkeypatch.setattr("evaluation.evaluator._TRANSFER_MAPS", 2)  # several block copies per class
    batches = _batches()
    spill_mb = 0.001 if spill else None
    numpy_ev = ADEvaluator(device="cpu")
    torch_ev = ADEvaluator(spill_dir=str(tmp_path), spill_mb=spill_mb, device="cpu")
    torch_ev._torch_device = torch.device("cpu")  # the CUDA code path, run on CPU tensors
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].device)
        return compute_metrics_torch(*args, **kwargs)

    monkeypatch.setattr(evaluation.metrics, "compute_metrics_torch", counting)
    for batch in batches:
        numpy_ev.update(*batch)
        torch_ev.update(*batch)
    assert bool(list(tmp_path.rglob("*.maps"))) == spill
    expected, got = numpy_ev.compute(), torch_ev.compute()
    assert calls == [torch.device("cpu")] * 2  # one call per class, on the maps moved to the device
    for cls in ("a", "b", "mean"):
        assert got[cls] == pytest.approx(expected[cls], abs=1e-12), cls
    store = torch_ev._stores["a"]
    on_device = store.maps_on(torch.device("cpu"))
    assert on_device.dtype == torch.float16 and np.array_equal(on_device.numpy(), np.asarray(store.maps()))


def test_device_out_of_memory_falls_back_to_numpy(monkeypatch, caplog) -> None:
    """A class whose maps do not fit on the GPU is scored with numpy, with a warning naming it."""
    batches = _batches()
    numpy_ev = ADEvaluator(device="cpu")
    torch_ev = ADEvaluator(device="cpu")
    torch_ev._torch_device = torch.device("cpu")  # the CUDA code path, run on CPU tensors
    calls = []

    def out_of_memory_for_a(maps, *args, **kwargs):
        calls.append(len(maps))
        if len(calls) == 1:  # the first class ("a") does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return compute_metrics_torch(maps, *args, **kwargs)

    monkeypatch.setattr(evaluation.metrics, "compute_metrics_torch", out_of_memory_for_a)
    for batch in batches:
        numpy_ev.update(*batch)
        torch_ev.update(*batch)
    with caplog.at_level(logging.WARNING, logger="mambaad.evaluator"):
        got = torch_ev.compute()
    expected = numpy_ev.compute()
    assert len(calls) == 2
    assert "class a:" in caplog.text and "numpy on the CPU" in caplog.text and "class b" not in caplog.text
    for cls in ("a", "b", "mean"):
        assert got[cls] == pytest.approx(expected[cls], abs=1e-12), cls


def test_device_option(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ADEvaluator(device="auto")._torch_device is None
    assert ADEvaluator(device="cpu")._torch_device is None
    with pytest.raises(ValueError, match=r"evaluator\.device='cuda' but CUDA is not available"):
        ADEvaluator(device="cuda")
    with pytest.raises(ValueError, match=r"evaluator\.device='gpu0' is not a device"):
        ADEvaluator(device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ADEvaluator(device="auto")._torch_device == torch.device("cuda")
    assert ADEvaluator(device="cuda:1")._torch_device == torch.device("cuda:1")


@pytest.mark.cuda
def test_cuda_evaluator_gives_the_numpy_numbers() -> None:
    numpy_ev, cuda_ev = ADEvaluator(device="cpu"), ADEvaluator(device="cuda")
    for batch in _batches():
        numpy_ev.update(*batch)
        cuda_ev.update(*batch)
    expected, got = numpy_ev.compute(), cuda_ev.compute()
    for cls in ("a", "b", "mean"):
        assert got[cls] == pytest.approx(expected[cls], abs=1e-9), cls
