"""Evaluation protocol switches (evaluator.*) and the metrics of other frameworks, on hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import run
from evaluation.evaluator import ADEvaluator
from evaluation.metrics import compute_metrics
from evaluation.metrics_extra import aupimo, miou_max, seg_f1
from evaluation.metrics_mambaad import mambaad_pixel_metrics
from evaluation.protocol import image_scores, resize_masks, smooth_maps
from util.config import load_config

ROOT = Path(__file__).resolve().parent.parent


# ---- image score -------------------------------------------------------------------------------


def test_image_scores_by_hand() -> None:
    maps = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 8.0]]])
    assert image_scores(maps, "max").item() == 8.0
    # top 25 % of 9 pixels: int(2.25) = 2 pixels, 8 and 4
    assert image_scores(maps, "topk_mean", top_percent=25).item() == pytest.approx(6.0)
    # top 1 % of 9 pixels rounds down to 0: at least one pixel is kept
    assert image_scores(maps, "topk_mean", top_percent=1).item() == 8.0
    # 2x2 means: (1+2+3+4)/4 = 2.5, (2+0+4+0)/4 = 1.5, (3+4+0+0)/4 = 1.75, (4+0+0+8)/4 = 3
    assert image_scores(maps, "pooled_max", pool=2).item() == pytest.approx(3.0)
    # a kernel larger than the map is clipped to it: the mean of all 9 pixels
    assert image_scores(maps, "pooled_max", pool=16).item() == pytest.approx(18.0 / 9)


def test_image_score_switch_replaces_the_methods_scores() -> None:
    maps = torch.zeros(4, 8, 8)
    maps[0, 0, 0] = 1.0  # one hot pixel: the max (the method's score) ranks the normal image first
    maps[1:, 4:, 4:] = 0.5  # a wide region in the others: 2x2 means of 0.5, above image 0's 0.25
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[1:, 4:, 4:] = True
    labels = torch.tensor([0, 1, 1, 1])
    method_scores = maps.flatten(1).amax(1)
    results = {}
    for kind in ("model", "pooled_max"):
        ev = ADEvaluator(device="cpu", image_score=kind, image_score_pool=2, metrics=["I-AUROC"])
        ev.update(maps, method_scores, masks, labels, ["c"] * 4)
        results[kind] = ev.compute()["c"]["I-AUROC"]
    assert results == {"model": 0.0, "pooled_max": 1.0}


# ---- smoothing, resolution, mask binarisation --------------------------------------------------


def test_smoothing_taps_by_hand_and_default_as_scipy() -> None:
    delta = torch.zeros(1, 7, 7)
    delta[0, 3, 3] = 1.0
    # 3 taps of sigma 1: weights exp(-1/2), 1, exp(-1/2), normalised; the centre gets w0 squared
    w0 = 1.0 / (1.0 + 2.0 * math.exp(-0.5))
    out = smooth_maps(delta, 1.0, taps=3)
    assert out[0, 3, 3].item() == pytest.approx(w0**2, rel=1e-6)
    assert out[0, 3, 5].item() == 0.0  # beyond the 3x3 support
    # default taps: scipy's gaussian_filter (truncate 4, 'reflect'); float32 sums: rel 1e-5
    rng = np.random.default_rng(0)
    maps = rng.random((2, 20, 20)).astype(np.float32)
    ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), 2.0) for m in maps])
    np.testing.assert_allclose(smooth_maps(torch.from_numpy(maps), 2.0).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_mask_threshold_after_resize_by_hand() -> None:
    # 2x2 -> 4x4 bilinear (align_corners=False): the weights of source pixel 0 along an axis are
    # 1, 0.75, 0.25, 0; the top-left pixel's 4x4 values are their products
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert int(resize_masks(mask, (4, 4), 0.5).sum()) == 4  # 1, 0.75, 0.75, 0.5625
    assert int(resize_masks(mask, (4, 4), 0.0).sum()) == 9  # every product of non-zero weights
    assert int(resize_masks(mask, (2, 2), 0.0).sum()) == 1  # no resize: binarised only


def test_resolution_and_mask_threshold_reach_the_stored_maps() -> None:
    maps = torch.rand(2, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[1, 0:3, 0:3] = True
    for threshold, expected in ((0.5, 1), (0.0, 4)):
        ev = ADEvaluator(device="cpu", resolution=4, mask_threshold=threshold)
        ev.update(maps, maps.flatten(1).amax(1), masks, torch.tensor([0, 1]), ["c", "c"])
        store = ev._stores["c"]
        assert store.maps().shape == (2, 4, 4)
        # 8 -> 4 (align_corners=False) samples source coordinates 0.5, 2.5, ...: along an axis the
        # 3-pixel defect gives 1 at 0.5 and 0.5 at 2.5; the 2x2 products are 1, 0.5, 0.5, 0.25
        assert int(store.masks().sum()) == expected


# ---- AU-PRO limit and steps --------------------------------------------------------------------


def test_aupro_limit_by_hand() -> None:
    # one image, one defect pixel (0.3) and three normal ones (0.4, 0.2, 0.1): from (0, 0) the
    # PRO curve stays at 0 up to FPR 1/3 (the 0.4 pixel), then is 1
    maps = np.array([[[0.4, 0.3, 0.2, 0.1]]])
    masks = np.array([[[False, True, False, False]]])
    labels = np.array([1])
    area = {
        limit: compute_metrics(maps, masks, labels, metrics=["AUPRO"], aupro_limit=limit)["AUPRO"]
        for limit in (0.3, 0.5, 1.0)
    }
    assert area[0.3] == pytest.approx(0.0)
    assert area[0.5] == pytest.approx((0.5 - 1 / 3) / 0.5)
    assert area[1.0] == pytest.approx(2 / 3)


def test_aupro_steps_reach_the_mambaad_sweep_and_are_refused_elsewhere() -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((4, 16, 16))
    masks = np.zeros((4, 16, 16), bool)
    masks[2:, 3:9, 3:9] = True
    maps[masks] += 0.4
    labels = np.array([0, 0, 1, 1])
    ours = compute_metrics(maps, masks, labels, metrics=["AUPRO"], mode="mambaad", aupro_steps=7)["AUPRO"]
    assert ours == mambaad_pixel_metrics(maps, masks, steps=7)["AUPRO"]
    assert ours != compute_metrics(maps, masks, labels, metrics=["AUPRO"], mode="mambaad")["AUPRO"]
    with pytest.raises(ValueError, match="aupro_steps"):
        ADEvaluator(mode="exact", aupro_steps=7)


# ---- P-mIoU-max, SegF1, AUPIMO -----------------------------------------------------------------


def test_miou_max_by_hand() -> None:
    # min 0, max 1, so the normalised maps are the maps; 2 defect pixels (0.9 and 0.95) in the class
    maps = np.array([[[0.0, 0.5, 0.9, 1.0]], [[0.2, 0.95, 0.0, 0.0]]])
    masks = np.array([[[0, 0, 1, 0]], [[0, 1, 0, 0]]], bool)
    # norm > t for t in [0.5, 0.9): predicted 0.9, 1.0, 0.95; intersection 2, union 3: the best
    # (t < 0.2: 2 / 5; t in [0.2, 0.5): 2 / 4; t in [0.9, 0.95): 1 / 3)
    assert miou_max(maps, masks) == pytest.approx(2 / 3, abs=1e-8)
    # pooled over the class, not a mean of per-image IoUs (image 1 alone reaches 1 at t in [0.5, 0.9))
    assert miou_max(maps[:1], masks[:1]) == pytest.approx(1 / 2, abs=1e-8)
    assert math.isnan(miou_max(maps, np.zeros_like(masks)))


def test_seg_f1_by_hand() -> None:
    maps = np.array([[[0.2, 0.6, 0.7, 0.4]]])
    masks = np.array([[[0, 1, 0, 1]]], bool)
    assert seg_f1(maps, masks, 0.5) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # TP 1, FP 1, FN 1
    # normal_test: the normal image's pixels 0, 0, 0, 4 have mean 1 and std sqrt(3)
    maps = np.array([[[0.0, 0.0, 0.0, 4.0]], [[7.0, 6.0, 0.0, 0.0]]])
    masks = np.array([[[0, 0, 0, 0]], [[1, 1, 0, 0]]], bool)
    assert 1 + 3 * math.sqrt(3) == pytest.approx(6.196, abs=1e-3)  # so 7 is predicted, 6 is not
    assert seg_f1(maps, masks) == pytest.approx(2 / 3)  # TP 1, FN 1, FP 0
    # validation (MVTec AD 2): held-out normal maps with pixels 1, 1, 1, 3: mean 1.5, std sqrt(0.75),
    # threshold 1.5 + 3 * 0.866 = 4.10: 7 and 6 predicted, 4 not
    validation = np.array([[[1.0, 1.0]], [[1.0, 3.0]]])
    assert seg_f1(maps, masks, "validation", validation=validation) == pytest.approx(1.0)  # TP 2
    assert math.isnan(seg_f1(maps, masks, "validation"))  # no validation images: undefined
    with pytest.raises(ValueError, match="normal_test"):
        seg_f1(maps, masks, "val")


def test_aupimo_by_hand() -> None:
    # normal image: 10 pixels 0..9, thresholds linspace(0, 9, 10) = 0..9, FPR(t = k) = (10 - k) / 10;
    # bounds (0.1, 0.4) select t = 6..9 (FPR 0.4 .. 0.1)
    normal = np.arange(10.0)
    first = np.zeros(10)
    first[:2] = [7.5, 8.5]  # TPR 1, 1, 0.5, 0 at t = 6, 7, 8, 9
    second = np.zeros(10)
    second[:2] = 100.0  # TPR 1 everywhere
    maps = np.stack([normal, first, second])[:, None, :].astype(np.float32)
    masks = np.zeros((3, 1, 10), bool)
    masks[1:, 0, :2] = True
    result = aupimo(maps, masks, num_thresholds=10, fpr_bounds=(0.1, 0.4))
    # trapezoids over log FPR from 0.1 to 0.4 of TPR 0, 0.5, 1, 1, divided by log 4
    expected = (0.25 * math.log(2) + 0.75 * math.log(1.5) + math.log(4 / 3)) / math.log(4)
    np.testing.assert_allclose(result["per_image"], [expected, 1.0], rtol=1e-12)
    assert result["AUPIMO"] == pytest.approx((expected + 1) / 2)
    assert result["AUPIMO-std"] == pytest.approx((1 - expected) / math.sqrt(2))
    assert result["points"] == 4
    assert math.isnan(aupimo(maps[1:], masks[1:])["AUPIMO"])  # no normal image


def test_extra_metrics_stream_from_spilled_maps_and_follow_the_seven() -> None:
    rng = np.random.default_rng(2)
    maps = torch.from_numpy(rng.random((12, 32, 32)).astype(np.float32))
    masks = torch.zeros(12, 32, 32, dtype=torch.bool)
    masks[6:, 4:14, 4:14] = True
    maps[masks] += 0.5
    labels = torch.tensor([0] * 6 + [1] * 6)
    rows = []
    for spill_mb in (None, 0):  # 0: every map goes to a file and is read back as a memory map
        ev = ADEvaluator(
            device="cpu",
            spill_mb=spill_mb,
            map_dtype="float32",
            metrics=["P-AP", "P-mIoU-max", "AUPIMO", "SegF1"],
        )
        for start in range(0, 12, 4):
            ev.update(
                maps[start : start + 4],
                maps[start : start + 4].flatten(1).amax(1),
                masks[start : start + 4],
                labels[start : start + 4],
                ["c"] * 4,
            )
        rows.append(ev.compute()["c"])
        assert (ev._stores["c"].file is not None) == (spill_mb == 0)
    assert rows[0] == rows[1]
    assert list(rows[0]) == ["P-AP", "mAD", "P-mIoU-max", "AUPIMO", "AUPIMO-std", "SegF1"]
    m = maps.numpy()
    assert rows[0]["P-mIoU-max"] == miou_max(m, masks.numpy())
    assert rows[0]["SegF1"] == seg_f1(m, masks.numpy())


# ---- two tables, config keys, paper configs ----------------------------------------------------


def test_non_exact_modes_also_record_the_exact_table() -> None:
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.random((6, 16, 16)).astype(np.float32))
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[3:, 2:8, 2:8] = True
    maps[masks] += 0.3
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    tables = {}
    for mode, also in (("exact", True), ("mambaad", True), ("mambaad", False)):
        ev = ADEvaluator(device="cpu", mode=mode, also_exact=also)
        ev.update(maps, maps.flatten(1).amax(1), masks, labels, ["c"] * 6)
        tables[(mode, also)] = (ev.compute(), ev.exact_results)
    assert tables[("exact", True)][1] is None and tables[("mambaad", False)][1] is None
    assert tables[("mambaad", True)][1] == tables[("exact", True)][0]


@pytest.mark.parametrize(
    ("config", "mode", "dtype"),
    [
        ("mambaad_mvtec", "mambaad", "float32"),
        ("mambaad_realiad", "mambaad", "float32"),
        ("rd4ad_visa", "ader", "float32"),
        ("uniad_mvtec", "ader", "float32"),
        ("mambaad_demo", "exact", "float16"),
    ],
)
def test_paper_configs_score_as_their_authors(config: str, mode: str, dtype: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{config}.py")
    assert (cfg.evaluator.mode, cfg.evaluator.map_dtype, cfg.evaluator.also_exact) == (mode, dtype, True)


@pytest.mark.parametrize(
    ("override", "choices"),
    [
        ("evaluator.image_score=mean", "'topk_mean'"),
        ("evaluator.metrics=['P-mIoU']", "P-mIoU-max"),
        ("evaluator.segf1_threshold=valid", "normal_test"),
        ("evaluator.smooth_taps=4", "odd"),
        ("evaluator.aupro_steps=50", "mode=mambaad"),
        ("evaluator.aupro_limit=0", "(0, 1]"),
        ("evaluator.mask_threshold=1.5", "[0, 1)"),
        ("evaluator.resolution=0", "[height, width]"),
        ("evaluator.image_score_k=0", "percentage"),
    ],
)
def test_a_switch_value_that_does_not_exist_is_one_clean_error(
    override: str, choices: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["-c", "configs/mambaad_demo.py", f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert (
        f"{key}=" in err and choices in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    )
