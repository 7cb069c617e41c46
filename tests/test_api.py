"""The Python API (mambaad.load_model / mambaad.predict) on a tiny random model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.default_ad import load_image
from data.synthetic import generate_demo_dataset
from mambaad import Detector, config_from_run, load_model, predict, prepare_image
from model.anomaly_map import anomaly_maps_and_scores
from model.build import build_model
from tests.rounding import maps_tolerance
from util.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs/mambaad_demo.py"
SMALL = [
    "model.depths=[2,2,2,2]",
    "model.teacher.name=resnet18",
    "data.image_size=64",
    "model.scan.directions=2",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random model saved as a run folder (config.json + net.pth) and as a bare file."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    cfg = load_config(CONFIG, SMALL)
    model = build_model(cfg, logging.getLogger("test_api"))
    run = root / "run"
    run.mkdir()
    save_config(cfg, run / "config.json")
    torch.save(model.state_dict(), run / "net.pth")
    bare = root / "bare.pth"
    torch.save({"net": model.state_dict()}, bare)
    generate_demo_dataset(
        root / "data", image_size=48, n_train=1, n_test_good=1, n_test_bad=2, classes=["wood"]
    )
    images = sorted((root / "data" / "wood" / "test").rglob("*.png"))[:3]
    return {"run": run, "bare": bare, "images": images}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def model(saved: dict) -> Detector:
    return load_model(saved["run"])


def test_predict_matches_the_evaluation_path(saved: dict, model: Detector) -> None:
    assert isinstance(model, Detector) and model.image_size == (64, 64)
    assert not model.net.training
    result = predict(model, saved["images"], batch_size=2)
    assert result.maps.shape == (3, 64, 64) and result.maps.dtype == np.float32
    assert result.scores.shape == (3,) and len(result) == 3
    np.testing.assert_allclose(result.scores, result.maps.reshape(3, -1).max(axis=1), rtol=1e-6)
    imgs = torch.stack([load_image(p, 64) for p in saved["images"]])
    with torch.no_grad():
        maps, scores = anomaly_maps_and_scores(*model.net(imgs), (64, 64), model.cfg.model.sigma)
    tol = maps_tolerance(model.net, imgs)  # batches of 2 + 1 against one of 3
    np.testing.assert_allclose(result.maps, maps.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(result.scores, scores.numpy(), rtol=0, atol=tol)


def test_paths_pil_images_and_arrays_agree(saved: dict, model: Detector) -> None:
    path = saved["images"][1]
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    assert torch.equal(prepare_image(pil, (64, 64)), load_image(path, 64))
    result = predict(model, [path, pil, arr, arr[..., 0]])
    assert result.scores[0] == result.scores[1] == result.scores[2]
    np.testing.assert_array_equal(result.maps[0], result.maps[2])
    assert np.isfinite(result.scores[3])  # grayscale array
    single = model.predict(arr)
    tol = maps_tolerance(model.net, load_image(path, 64)[None])
    assert single.scores[0] == pytest.approx(result.scores[0], abs=tol)  # batch of 1 vs 4


def test_bare_checkpoint_needs_the_config_and_weights_agree(saved: dict, model: Detector) -> None:
    from_run = model
    bare = load_model(saved["bare"], config=CONFIG, overrides=SMALL)
    for key, value in from_run.net.state_dict().items():
        assert torch.equal(bare.net.state_dict()[key], value), key
    img = saved["images"][0]
    assert predict(bare, [img]).scores[0] == predict(from_run, [img]).scores[0]
    # the paper model does not fit the small weights: the error names the keys to check
    with pytest.raises(RuntimeError, match=r"model\.depths"):
        load_model(saved["bare"])


def test_config_from_run_restores_every_value(saved: dict) -> None:
    cfg = config_from_run(saved["run"])
    assert cfg.model.depths == [2, 2, 2, 2] and cfg.model.teacher.name == "resnet18"
    assert cfg.data.image_size == 64 and cfg.model.scan.directions == 2
    assert config_from_run(saved["run"], ["model.sigma=2.0"]).model.sigma == 2.0


def test_input_errors(model: Detector, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        predict(model, [np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(TypeError, match="paths, PIL images or uint8 arrays"):
        predict(model, [42])
    with pytest.raises(ValueError, match="at least one"):
        predict(model, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither net\.pth nor ckpt\.pth"):
        load_model(tmp_path / "empty_run")


def test_a_run_of_another_method_loads_with_its_own_defaults(tmp_path: Path) -> None:
    # config.json naming a file outside configs/: rebuilt over the run's method's defaults
    # (configs/<type>_defaults.py, or configs/base.py for a method of yours), never MambaAD's
    from tests.test_method_contract import CONFIG as TOY_CONFIG
    from util.config import load_config, save_config
    from util.run_config import load_run_config

    config = tmp_path / "toy.py"
    config.write_text(TOY_CONFIG.format(type="toy_reconstruction"))
    save_config(load_config(config, [f"data.root={tmp_path}"]), tmp_path / "config.json")
    cfg = load_run_config(tmp_path)
    assert cfg.model.type == "toy_reconstruction" and not hasattr(cfg.model, "teacher")
    (tmp_path / "config.json").write_text(
        (tmp_path / "config.json").read_text().replace('"toy_reconstruction"', '"uniad"')
    )
    assert load_run_config(tmp_path).model.score_pool == 16  # UniAD's defaults filled the rest
