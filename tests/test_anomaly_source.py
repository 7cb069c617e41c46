"""Anomaly sources and synthesis (data/anomaly_source.py, data/synthesis.py, data/synthesized.py):
Perlin noise against a hand computation, the paste rule, seeding by (seed, epoch, index), the
procedural source, and DTD's preparation and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.anomaly_source import DTDSource, MissingAnomalySourceError, ProceduralSource, prepare_dtd
from data.synthesis import anomaly_mask, paste_texture, perlin_noise, sample_rng
from data.synthesized import SynthesizedAD
from tools import prepare_data

QUIET = {"log": lambda s: None}


class _Angles:
    """A generator stand-in that hands out fixed gradient angles (as fractions of a turn)."""

    def __init__(self, fractions: np.ndarray) -> None:
        self.fractions = fractions

    def random(self, shape: tuple[int, int]) -> np.ndarray:
        assert shape == self.fractions.shape
        return self.fractions


def test_perlin_noise_equals_a_hand_computation() -> None:
    # one cell, every gradient (1, 0): the four corner dot products are gy, gy - 1, gy, gy - 1, so
    # the noise is sqrt(2) * (gy - fade(gy)) along the first axis and constant along the second
    noise = perlin_noise(_Angles(np.zeros((2, 2))), (8, 6), (1, 1))
    gy = np.arange(8) / 8
    fade = 6 * gy**5 - 15 * gy**4 + 10 * gy**3
    want = np.sqrt(2) * (gy - fade)
    assert noise.shape == (8, 6)
    np.testing.assert_allclose(noise, np.repeat(want[:, None], 6, axis=1), rtol=0, atol=1e-12)
    # gradients (0, 1): the same along the second axis
    quarter = perlin_noise(_Angles(np.full((2, 2), 0.25)), (6, 8), (1, 1))
    np.testing.assert_allclose(quarter, np.repeat(want[None, :], 6, axis=0), rtol=0, atol=1e-12)
    # a side the cells do not divide is computed on the next multiple and cropped
    odd = perlin_noise(np.random.default_rng(0), (10, 7), (4, 2))
    assert odd.shape == (10, 7) and np.isfinite(odd).all()
    assert math.isclose(
        float(np.abs(perlin_noise(_Angles(np.zeros((5, 3))), (8, 8), (4, 2))[::2, ::4]).max()), 0.0
    )


def test_paste_replaces_the_masked_pixels_only() -> None:
    image = np.zeros((32, 32, 3), np.float32)
    texture = np.ones((32, 32, 3), np.float32)
    for seed in range(20):
        augmented, mask = paste_texture(image, texture, np.random.default_rng(seed))
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert (augmented[mask == 0] == 0).all()  # outside: the image
        inside = augmented[mask == 1]
        if inside.size:  # inside: (1 - beta) * texture + beta * image, beta in [0, 0.8)
            assert np.ptp(inside) == 0 and 0.2 < inside.flat[0] <= 1.0


def test_synthesis_depends_on_seed_epoch_and_index_only() -> None:
    def draw(seed: int, epoch: int, index: int) -> np.ndarray:
        return anomaly_mask(sample_rng(seed, epoch, index), (64, 64))

    masks = [draw(42, e, i) for e in (1, 2) for i in range(6)]
    assert all(np.array_equal(draw(42, 1 + k // 6, k % 6), m) for k, m in enumerate(masks))  # reproducible
    distinct = {m.tobytes() for m in masks}
    assert len(distinct) >= 10  # other epochs and indices draw other masks (empty ones may repeat)
    assert any(not np.array_equal(draw(0, 1, i), draw(42, 1, i)) for i in range(6))


def test_training_items_are_synthesized_per_epoch(tiny_data: Path) -> None:
    logged: list[str] = []
    ds = SynthesizedAD(
        tiny_data, "train", {"type": "procedural", "seed": 3}, log=logged.append, image_size=32
    )
    assert any("PROCEDURAL" in line for line in logged)  # the demo source is announced
    ds.set_epoch(1)
    item = ds[1]
    assert item["augmented_image"].shape == item["img"].shape == (3, 32, 32)
    assert item["img_mask"].shape == (1, 32, 32) and item["anomaly"] == int(item["img_mask"].any())
    outside = item["img_mask"].expand(3, -1, -1) == 0
    assert torch.allclose(item["augmented_image"][outside], item["img"][outside], atol=1e-5)
    again = ds[1]
    assert torch.equal(again["augmented_image"], item["augmented_image"])
    ds.set_epoch(2)
    assert not torch.equal(ds[1]["augmented_image"], item["augmented_image"])
    test = SynthesizedAD(tiny_data, "test", {"type": "procedural", "seed": 3}, **QUIET, image_size=32)
    assert "augmented_image" not in test[0]  # test items are DefaultAD's


def test_procedural_textures_are_in_range_and_seeded() -> None:
    source = ProceduralSource(image_size=(24, 40), **QUIET)
    a = source.texture(np.random.default_rng(5))
    assert a.shape == (24, 40, 3) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, source.texture(np.random.default_rng(5)))
    assert not np.array_equal(a, source.texture(np.random.default_rng(6)))


def _fake_dtd(root: Path) -> Path:
    for category in ("banded", "zigzagged"):
        (root / "images" / category).mkdir(parents=True)
        for i in range(2):
            rgb = np.full((20, 30, 3), 40 * i + (0 if category == "banded" else 120), np.uint8)
            Image.fromarray(rgb).save(root / "images" / category / f"{category}_{i:04d}.jpg")
    (root / "images" / "banded" / "notes.txt").write_text("not an image")
    return root


def test_prepare_dtd_lists_the_textures_and_the_source_reads_them(tmp_path: Path, capsys) -> None:
    root = _fake_dtd(tmp_path / "dtd")
    assert prepare_data.main(["--dataset", "dtd", "--root", str(root), "--no-progress"]) == 0
    listed = json.loads((root / "textures.json").read_text())["textures"]
    assert listed == [
        "images/banded/banded_0000.jpg",
        "images/banded/banded_0001.jpg",
        "images/zigzagged/zigzagged_0000.jpg",
        "images/zigzagged/zigzagged_0001.jpg",
    ]
    assert prepare_data.main(["--dataset", "dtd", "--root", str(root), "--check", "--no-progress"]) == 0
    assert "4 textures" in capsys.readouterr().out
    source = DTDSource(root, 16, **QUIET)
    values = {round(float(source.texture(np.random.default_rng(s)).mean()) * 255) for s in range(40)}
    assert values == {0, 40, 120, 160}  # every file is drawn, resized to 16x16, scaled to [0, 1]
    (root / "images" / "zigzagged" / "zigzagged_0001.jpg").write_bytes(b"broken")
    assert prepare_data.main(["--dataset", "dtd", "--root", str(root), "--check", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "zigzagged_0001.jpg cannot be read" in err and "1 problem(s)" in err


def test_a_missing_dtd_is_one_paragraph_naming_the_key_and_the_download(tmp_path: Path, capsys) -> None:
    with pytest.raises(
        MissingAnomalySourceError, match=r"data\.anomaly_source\.root=.*dtd-r1\.0\.1\.tar\.gz"
    ):
        DTDSource(tmp_path / "nowhere", 32, **QUIET)
    (tmp_path / "unprepared" / "images").mkdir(parents=True)
    with pytest.raises(MissingAnomalySourceError, match=r"textures\.json not found"):
        DTDSource(tmp_path / "unprepared", 32, **QUIET)
    with pytest.raises(MissingAnomalySourceError, match=r"no \.jpg"):
        prepare_dtd(tmp_path / "unprepared")
    assert prepare_data.main(["--dataset", "dtd", "--root", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--dataset dtd" in err
