"""SimpleNet (model/simplenet, loss/truncated_l1.py, configs/simplenet_*.py): its loss and patch
features against hand computations, training with its two optimisers through the one trainer on
tiny generated data, maps and scores, ADer's checkpoint layout, a bit-exact resume in the middle
of an epoch (the noise comes from the checkpointed RNG) and its size against the paper's Table 5."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loss.truncated_l1 import TruncatedL1Loss
from model.anomaly_map import gaussian_blur
from model.base import CheckpointMismatchError
from model.build import build_model
from model.simplenet.features import patch_features
from model.simplenet.network import SimpleNet
from trainer.ad_trainer import ADTrainer
from trainer.rng import seed_everything
from util.checkpoint import load_file
from util.config import load_config
from util.signals import TrainingInterruptedError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "simplenet_demo.py"
QUIET = {"log": lambda s: None}


def test_truncated_l1_equals_a_hand_computation() -> None:
    true = torch.tensor([[0.7], [0.2], [-0.1]], requires_grad=True)
    fake = torch.tensor([[-0.9], [0.0], [0.5]], requires_grad=True)
    # margin 0.5: max(0, 0.5 - s) = 0, 0.3, 0.6 (mean 0.3); max(0, s + 0.5) = 0, 0.5, 1.0 (mean 0.5)
    terms = TruncatedL1Loss(weight=2.0).terms(true, fake, margin=0.5)
    assert terms["true"].item() == pytest.approx(2 * 0.3, abs=1e-6)
    assert terms["fake"].item() == pytest.approx(2 * 0.5, abs=1e-6)
    total = TruncatedL1Loss(weight=2.0)(true, fake, margin=0.5)
    assert total.item() == pytest.approx(1.6, abs=1e-6)
    total.backward()
    # scores past the margin cost nothing: no gradient there; elsewhere weight / n per score
    assert torch.allclose(true.grad, torch.tensor([[0.0], [-2 / 3], [-2 / 3]]))
    assert torch.allclose(fake.grad, torch.tensor([[0.0], [2 / 3], [2 / 3]]))


def test_patch_features_equal_a_hand_computation() -> None:
    # level 0: one channel on a 2x2 grid; level 1: one channel, one position (resized onto 2x2)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    v = 6.0
    b = torch.full((1, 1, 1, 1), v)
    got, grid = patch_features([a, b], patch_size=3, stride=1, embed_dim=3, target_dim=3)
    assert grid == (2, 2) and got.shape == (4, 3)
    # each level's zero-padded 3x3 neighbourhood (9 values, row by row) pooled to 3: the row means.
    # Neighbourhoods are taken before resizing (as ADer): level 1's is [[0,0,0],[0,v,0],[0,0,0]] at
    # every position of the 2x2 grid (resizing the whole map first would give [[0,0,0],[0,v,v],[0,v,v]])
    padded = F.pad(a[0, 0], (1, 1, 1, 1))
    rows_b = torch.tensor([0.0, v / 3, 0.0])
    for y in range(2):
        for x in range(2):
            rows_a = padded[y : y + 3, x : x + 3].mean(1)  # 3 values
            both = torch.cat([rows_a, rows_b])  # 6 values pooled to 3: neighbouring pairs averaged
            want = both.view(3, 2).mean(1)
            assert torch.allclose(got[y * 2 + x], want, atol=1e-6), (y, x)


def test_noise_has_the_configured_scale() -> None:
    torch.manual_seed(0)
    model = SimpleNet(
        teacher="resnet18", layers=["layer2"], embed_dim=8, target_dim=8, dsc_hidden=8, image_size=64, **QUIET
    )
    noise = model.noise(torch.zeros(40_000, 8))
    # the sample standard deviation of 320,000 draws is within 0.5 % of 0.015 with certainty for
    # practical purposes (its own relative standard deviation is 1 / sqrt(2 * 320000) = 0.13 %)
    assert noise.std().item() == pytest.approx(0.015, rel=5e-3) and abs(noise.mean().item()) < 1e-4
    torch.manual_seed(3)
    wide = model.noise(torch.zeros(5, 8, dtype=torch.float64))
    torch.manual_seed(3)
    narrow = model.noise(torch.zeros(5, 8))
    # drawn in float32 as ADer draws it, whatever the features' type: the same numbers
    assert wide.dtype == torch.float64 and torch.equal(wide, narrow.double())


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
    """SimpleNet (ADer's architecture, random backbone) trained one epoch (2 steps of 4) at 64x64."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = tmp_path_factory.mktemp("simplenet")
    trainer = ADTrainer(_config(tmp, tiny_data))
    trainer.train()
    return trainer


def _initial(trainer: ADTrainer) -> SimpleNet:
    """The model as the trainer built it, before training (the trainer seeds before building)."""
    seed_everything(trainer.cfg.seed)
    return build_model(trainer.cfg, trainer.log)


def test_both_optimisers_step_with_aders_settings(trained: ADTrainer) -> None:
    model = trained.model
    assert isinstance(model, SimpleNet)
    assert set(trained.optimizers) == {"adaptor", "discriminator"}
    adaptor, disc = trained.optimizers["adaptor"], trained.optimizers["discriminator"]
    assert type(adaptor) is torch.optim.AdamW and type(disc) is torch.optim.Adam
    lr = 5e-4 * 4 / 16  # optim.base_lr x batch / 16 (ADer: 0.001 x batch / 32)
    decayed, undecayed = adaptor.param_groups  # the adaptor's weight decays, its bias does not
    assert [p.shape for p in decayed["params"]] == [(1536, 1536)] and decayed["weight_decay"] == 0.01
    assert [p.shape for p in undecayed["params"]] == [(1536,)] and undecayed["weight_decay"] == 0.0
    decayed, undecayed = disc.param_groups  # linear weights decay; biases and BatchNorm do not
    assert [p.shape for p in decayed["params"]] == [(1024, 1536), (1, 1024)]
    assert decayed["weight_decay"] == pytest.approx(1e-5) and undecayed["weight_decay"] == 0.0
    assert len(undecayed["params"]) == 3
    for opt, scale in ((adaptor, 0.1), (disc, 0.2)):
        for group in opt.param_groups:  # constant: ADer's schedule steps an optimiser it never uses
            assert group["lr"] == group["initial_lr"] == pytest.approx(lr * scale)
        assert opt.state_dict()["state"]  # it stepped
    owned = {id(p) for o in (adaptor, disc) for g in o.param_groups for p in g["params"]}
    assert owned == {id(p) for p in model.parameters() if p.requires_grad}
    before, after = _initial(trained).state_dict(), model.state_dict()
    for key in (
        "pre_projection.layers.0fc.weight",
        "discriminator.body.block1.0.weight",
        "discriminator.tail.weight",
    ):
        assert not torch.equal(before[key], after[key]), key
    assert torch.equal(before["backbone.layer3.0.conv1.weight"], after["backbone.layer3.0.conv1.weight"])
    assert (trained.run_dir / "metrics.json").is_file()


def test_every_trainable_parameter_gets_a_gradient(trained: ADTrainer) -> None:
    # what DDP needs without find_unused_parameters: nothing trainable is left out of forward
    model = _initial(trained).train()
    assert model.unused_parameter_names() == []
    batch = next(iter(trained.train_loader))
    terms = model.loss_terms(model(*model.train_inputs(batch)), batch, trained.loss_fn)
    assert set(terms) == {"true", "fake"} and all(t.item() >= 0 for t in terms.values())
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == (not name.startswith("backbone.")), name


def test_maps_and_scores(trained: ADTrainer) -> None:
    model = trained.model.eval()
    imgs = next(iter(trained.test_loader))["img"][:2]
    rng = torch.get_rng_state()
    maps, scores = model.predict(imgs)
    assert torch.equal(torch.get_rng_state(), rng)  # testing draws no noise
    assert maps.shape == (2, 64, 64) and scores.shape == (2,) and torch.isfinite(maps).all()
    assert torch.equal(scores, maps.flatten(1).amax(1))  # ADer's evaluator: the map's maximum
    patch = model.patch_scores(imgs)
    assert patch.shape == (2, 8, 8)  # layer2's grid at stride 8
    want = gaussian_blur(F.interpolate(patch.unsqueeze(1), size=(64, 64), mode="bilinear")[:, 0], 4.0)
    assert torch.equal(maps, want)
    assert torch.equal(model(imgs), patch)  # in eval mode, forward gives the positions' scores
    resized, _ = model.predict(imgs, (40, 36))
    assert resized.shape == (2, 40, 36)


def _ader_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in ADer's SIMPLENET names: the backbone three times, the heads in net_simplenet."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            rest = key.removeprefix("backbone.")
            for prefix in (
                "model_backbone.",
                "net_simplenet.backbone.",
                "net_simplenet.forward_modules.feature_aggregator.backbone.",
            ):
                out[prefix + rest] = value
        else:
            out["net_simplenet." + key] = value
    return out


def test_checkpoints_ours_and_aders_reload_strictly(trained: ADTrainer, tmp_path: Path) -> None:
    model = trained.model.eval()
    imgs = next(iter(trained.test_loader))["img"][:2]
    want, _ = model.predict(imgs)
    state = model.state_dict()
    ader = tmp_path / "ader_ckpt.pth"  # ADer's ckpt.pth: {"net": ...}, DDP's "module." possible
    torch.save({"net": {f"module.{k}": v for k, v in _ader_layout(state).items()}}, ader)
    cfg = _config(tmp_path, Path(trained.cfg.data.root), f"model.checkpoint={trained.run_dir}")
    fresh = build_model(cfg, trained.log).eval()  # our net.pth, strictly
    assert fresh.state_dict().keys() == state.keys()
    assert torch.equal(fresh.predict(imgs)[0], want)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_weights(ader)
    assert torch.equal(fresh.predict(imgs)[0], want)
    partial = tmp_path / "partial.pth"
    torch.save({"net_simplenet.discriminator.tail.weight": state["discriminator.tail.weight"]}, partial)
    with pytest.raises(CheckpointMismatchError, match=r"model.checkpoint=.*partial.pth.*Missing key"):
        fresh.load_weights(partial)


def test_a_resume_in_the_middle_of_an_epoch_equals_an_uninterrupted_run(
    trained: ADTrainer, tmp_path: Path
) -> None:
    data = Path(trained.cfg.data.root)
    stopped = ADTrainer(_config(tmp_path / "a", data))
    stopped.stop.signal = signal.SIGTERM  # checkpoint after the first of the epoch's two steps
    with pytest.raises(TrainingInterruptedError, match=r"trainer\.resume="):
        stopped.train()
    saved = load_file(stopped.run_dir / "ckpt.pth")
    assert (saved["epoch"], saved["batches_done"]) == (0, 1)
    assert set(saved["optimizers"]) == {"adaptor", "discriminator"}
    resumed = ADTrainer(_config(tmp_path / "b", data, f"trainer.resume={stopped.run_dir}"))
    resumed.train()
    want, got = load_file(trained.run_dir / "net.pth"), load_file(resumed.run_dir / "net.pth")
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_a_different_noise_draw_changes_the_result(trained: ADTrainer) -> None:
    # the resume test above can fail: training depends on the noise, i.e. on the restored RNG
    batch = next(iter(trained.train_loader))
    model = _initial(trained).train()
    torch.manual_seed(1)
    a = model.loss_terms(model(batch["img"]), batch, trained.loss_fn)
    torch.manual_seed(2)
    b = model.loss_terms(model(batch["img"]), batch, trained.loss_fn)
    assert a["true"].item() != b["true"].item() or a["fake"].item() != b["fake"].item()


def test_parameter_count_matches_table_5(trained: ADTrainer) -> None:
    counts = trained.model.parameter_counts()
    assert counts["backbone"] == 68_883_240  # torchvision's wide_resnet50_2, layer4 and fc included
    assert counts["adaptor"] == 1536 * 1536 + 1536
    assert counts["discriminator"] == 1536 * 1024 + 1024 + 2 * 1024 + 1024  # linear, BatchNorm, tail
    assert (
        counts["total"] == 72_821_032 and counts["trainable"] == counts["adaptor"] + counts["discriminator"]
    )
    assert abs(counts["total"] / 1e6 - 72.8) / 72.8 < 0.05  # the MambaAD paper's Table 5


def test_configs_carry_aders_benchmark_settings() -> None:
    for name in ("mvtec", "visa", "medical", "realiad"):
        cfg = load_config(REPO / "configs" / f"simplenet_{name}.py")
        cfg.validate()
        assert cfg.data.root == f"datasets/{name}" and cfg.data.image_size == 256
        assert cfg.data.batch_size == 32 and cfg.optim.lr == pytest.approx(0.001)  # ADer's lr at 32
        m = cfg.model
        assert m.type == "simplenet" and m.teacher.name == "wide_resnet50_2.tv_in1k"
        assert list(m.layers) == ["layer2", "layer3"] and (m.embed_dim, m.target_dim) == (1536, 1536)
        assert (m.dsc_layers, m.dsc_hidden, m.noise_std, m.margin) == (2, 1024, 0.015, 0.5)
        assert (cfg.optim.type, cfg.optim.weight_decay, tuple(cfg.optim.betas)) == (
            "adamw",
            0.01,
            (0.9, 0.999),
        )
        assert cfg.scheduler.gamma == 1.0 and cfg.trainer.grad_clip == 5.0 and cfg.trainer.epochs == 100
        assert (cfg.loss.type, cfg.loss.weight) == ("truncated_l1", 1.0)
    load_config(DEMO).validate()
