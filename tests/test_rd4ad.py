"""RD4AD (model/rd4ad, loss/feature_cos.py, configs/rd4ad_*.py): trained by the one trainer on tiny
generated data, its maps and scores, its loss against a hand computation, checkpoints (ours and
ADer's layout) and its size against ADer's figure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loss.feature_cos import FeatureCosineLoss
from model.base import CheckpointMismatchError
from model.build import build_model
from model.rd4ad.network import RD4AD
from trainer.ad_trainer import ADTrainer
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "rd4ad_demo.py"
QUIET = {"log": lambda s: None}


def test_cosine_loss_equals_a_hand_computation() -> None:
    # level 1, two samples of shape [C=2, H=1, W=2], compared as flattened 4-vectors:
    # sample 0: (1,0,0,0) vs (1,1,0,0): cos = 1/sqrt(2); sample 1: (0,2,0,0) vs (0,-3,0,0): cos = -1
    t1 = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0]]).view(2, 2, 1, 2)
    s1 = torch.tensor([[1.0, 1, 0, 0], [0, -3, 0, 0]]).view(2, 2, 1, 2)
    # level 2, shape [C=1, H=1, W=1]: (2) vs (5): cos = 1; (-1) vs (4): cos = -1
    t2 = torch.tensor([2.0, -1.0]).view(2, 1, 1, 1)
    s2 = torch.tensor([5.0, 4.0]).view(2, 1, 1, 1)
    level1 = ((1 - 1 / math.sqrt(2)) + (1 - -1)) / 2  # batch mean
    level2 = ((1 - 1) + (1 - -1)) / 2
    want = 2.0 * (level1 + level2)  # summed over levels (ADer's avg=False), times the weight
    got = FeatureCosineLoss(weight=2.0)([t1, t2], [s1, s2])
    assert got.item() == pytest.approx(want, abs=1e-6)
    # whole maps, not pixels: per-pixel cosine of level 1 would give another value
    per_pixel = (1 - torch.nn.functional.cosine_similarity(t1, s1, dim=1)).mean()
    assert per_pixel.item() != pytest.approx(level1, abs=1e-3)
    half = FeatureCosineLoss()([t1.bfloat16()], [s1.bfloat16()])
    assert half.dtype == torch.float32 and half.item() == pytest.approx(level1, abs=1e-2)
    with pytest.raises(ValueError, match="scales"):
        FeatureCosineLoss()([t1, t2], [s1])


def _config(tmp_path: Path, data: Path, *overrides: str):
    return load_config(
        DEMO,
        [
            f"data.root={data}",
            "data.synthetic=False",
            "data.image_size=64",
            "data.batch_size=4",
            "model.teacher.pretrained=False",
            "trainer.epochs=1",
            "trainer.test_every=1",
            "trainer.log_every=1",
            "device=cpu",
            f"output_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ADTrainer:
    """RD4AD (ADer's architecture, random teacher) trained one epoch (2 steps) at 64x64."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = tmp_path_factory.mktemp("rd4ad")
    trainer = ADTrainer(_config(tmp, tiny_data))
    trainer.train()
    return trainer


def _test_images(trainer: ADTrainer) -> torch.Tensor:
    return next(iter(trainer.test_loader))["img"][:2]


def test_training_steps_one_adam_over_the_student(trained: ADTrainer) -> None:
    model = trained.model
    assert isinstance(model, RD4AD)
    (optimizer,) = trained.optimizers.values()
    assert type(optimizer) is torch.optim.Adam
    (group,) = optimizer.param_groups  # ADer: all of net.parameters() in one group, no decay
    assert group["betas"] == (0.5, 0.999) and group["weight_decay"] == 0.0
    assert group["initial_lr"] == pytest.approx(0.005 * 4 / 16)  # ADer's scaling: base_lr x batch / 16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable}
    assert not any(p.requires_grad for p in model.net_t.parameters())
    assert optimizer.state_dict()["state"]  # it stepped
    assert (trained.run_dir / "metrics.json").is_file()


def test_maps_and_scores(trained: ADTrainer) -> None:
    model = trained.model.eval()
    imgs = _test_images(trained)
    maps, scores = model.predict(imgs)
    assert maps.shape == (imgs.shape[0], 64, 64) and scores.shape == (imgs.shape[0],)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert torch.equal(scores, maps.flatten(1).amax(1))
    resized, _ = model.predict(imgs, (48, 40))
    assert resized.shape == (imgs.shape[0], 48, 40)


def test_checkpoints_reload_strictly_with_identical_maps(trained: ADTrainer, tmp_path: Path) -> None:
    model = trained.model.eval()
    imgs = _test_images(trained)
    want, _ = model.predict(imgs)
    state = model.state_dict()
    ader = tmp_path / "ader_ckpt.pth"  # ADer: ckpt.pth holds {"net": ...}; DDP-wrapped keys have "module."
    torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, ader)
    cfg = _config(tmp_path, Path(trained.cfg.data.root), f"model.checkpoint={trained.run_dir}")
    fresh = build_model(cfg, trained.log).eval()  # loads the run's net.pth strictly
    assert fresh.state_dict().keys() == state.keys()
    assert torch.equal(fresh.predict(imgs)[0], want)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_weights(ader)
    assert torch.equal(fresh.predict(imgs)[0], want)
    partial = tmp_path / "partial.pth"  # one decoder tensor: every other key is missing
    key = "net_s.layer3.5.conv1.weight"
    torch.save({key: state[key]}, partial)
    with pytest.raises(CheckpointMismatchError, match=r"Missing key\(s\).*net_t\.conv1\.weight"):
        fresh.load_weights(partial)


def test_parameter_count_equals_aders(trained: ADTrainer) -> None:
    # ADer's figure (80.61 M, MambaAD paper Table 5: 80.6 M) is fvcore's parameter_count over all
    # of net.parameters(), the frozen teacher included; the count does not depend on the input size.
    counts = trained.model.parameter_counts()
    assert counts["total"] == 80_609_600
    assert round(counts["total"] / 1e6, 2) == 80.61
    assert counts["teacher"] == 24_862_528  # WideResNet50-2 up to layer3
    assert counts["trainable"] == counts["bottleneck"] + counts["decoder"]


def test_configs_carry_aders_benchmark_settings() -> None:
    for name in ("mvtec", "visa", "medical", "realiad"):
        cfg = load_config(REPO / "configs" / f"rd4ad_{name}.py")
        cfg.validate()
        assert cfg.data.root == f"datasets/{name}" and cfg.data.image_size == 256
        assert cfg.model.type == "rd4ad" and cfg.model.teacher.name == "wide_resnet50_2.racm_in1k"
        assert (cfg.optim.type, cfg.optim.lr, tuple(cfg.optim.betas)) == ("adam", 0.005, (0.5, 0.999))
        assert cfg.optim.weight_decay == 0 and cfg.trainer.grad_clip == 5.0
        assert (cfg.loss.type, cfg.loss.weight) == ("feature_cos", 1.0)
        assert cfg.trainer.epochs == 100 and cfg.scheduler.milestones == [80]
    load_config(DEMO).validate()
