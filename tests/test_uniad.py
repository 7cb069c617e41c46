"""UniAD (model/uniad): trained by the one trainer on tiny data; its map, score, loss, jitter and
checkpoints as ADer's ``model/uniad.py`` and benchmark define them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configs.uniad_defaults import UniADDefaults
from loss.feature_mse import FeatureMSELoss
from model.build import build_model
from model.uniad.backbone import extract_features
from model.uniad.network import UniAD, count_parameters, pooled_max
from model.uniad.transformer import neighbour_mask
from trainer.ad_trainer import ADTrainer
from util.config import ConfigError, load_config

QUIET = {"log": lambda s: None}
RANDOM_B4 = {"name": "tf_efficientnet_b4", "pretrained": False}


def _config(data: Path, out: Path, *overrides: str):
    return load_config(
        Path("configs/uniad_demo.py"),
        [
            f"data.root={data}",
            "data.synthetic=False",
            "data.batch_size=4",
            "trainer.epochs=1",
            "trainer.test_every=1",
            "model.teacher.calibrate_batches=1",
            "device=cpu",
            f"output_dir={out}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ADTrainer:
    """UniAD trained one epoch (2 steps of 4 images, 64x64, random backbone) and tested."""
    trainer = ADTrainer(_config(tiny_data, tmp_path_factory.mktemp("uniad_runs"), "data.image_size=64"))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_trained_with_the_one_trainer(trained: ADTrainer) -> None:
    model = trained.model
    assert isinstance(model, UniAD)
    assert (trained.run_dir / "net.pth").is_file() and (trained.run_dir / "metrics.json").is_file()
    assert not any(p.requires_grad for p in model.net_backbone.parameters())
    assert model.net_ad.transformer.mask.shape == (16, 16)  # 4x4 features at 64x64
    groups = trained.optimizers["main"].param_groups
    assert groups[0]["initial_lr"] == pytest.approx(1e-4 * 4 / 8)  # ADer: 1e-4 x batch / 8
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]


def test_map_is_the_upsampled_l2_norm_and_score_the_pooled_max(trained: ADTrainer, images) -> None:
    model = trained.model.eval()
    maps, scores = model.predict(images)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    with torch.no_grad():
        (align,), (rec,) = model(images)
    small = (rec - align).pow(2).sum(1, keepdim=True).sqrt()
    want = F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(maps, want)
    assert model.score_pool == 4  # the demo's pool: ADer's 16 at 256, scaled to 64
    pooled = F.avg_pool2d(want[:, None], 4, stride=1)
    torch.testing.assert_close(scores, pooled.flatten(1).amax(1))
    other, other_scores = model.predict(images, (32, 48))  # out_size changes the map, not the score
    assert other.shape == (2, 32, 48)
    torch.testing.assert_close(other_scores, scores)


def test_pooling_rule_on_a_hand_made_map() -> None:
    maps = torch.zeros(2, 8, 8)
    maps[0, 0, 0] = 16.0  # one hot pixel: a 4x4 mean sees it once
    maps[1, 2:6, 2:6] = 1.0  # a 4x4 block: one window covers it all
    maps[1, 7, 7] = 3.0
    assert pooled_max(maps, 4).tolist() == [1.0, 1.0]
    assert pooled_max(maps, 1).tolist() == [16.0, 3.0]  # no pooling: the plain maximum
    assert pooled_max(maps, 16).tolist() == [16.0 / 64, (16.0 + 3.0) / 64]  # clipped to the map


def test_jitter_only_in_training(trained: ADTrainer, images) -> None:
    model = trained.model
    model.eval()
    with torch.no_grad():
        first, second = model(images)[1][0], model(images)[1][0]
    assert torch.equal(first, second)  # eval: no jitter, no dropout
    model.train()
    for m in model.modules():  # dropout off: only the jitter can differ
        if isinstance(m, torch.nn.Dropout | torch.nn.MultiheadAttention):
            setattr(m, "p" if isinstance(m, torch.nn.Dropout) else "dropout", 0.0)
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            a = model(images)
            b = model(images)
            torch.manual_seed(0)
            c = model(images)
        assert torch.equal(a[0][0], b[0][0])  # the target is never jittered
        assert not torch.allclose(a[1][0], b[1][0])  # fresh noise per batch
        assert torch.equal(a[1][0], c[1][0])  # drawn from the seeded torch generator
    finally:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout | torch.nn.MultiheadAttention):
                setattr(m, "p" if isinstance(m, torch.nn.Dropout) else "dropout", 0.1)
        model.eval()


def test_jitter_noise_follows_the_authors_formula(trained: ADTrainer) -> None:
    tokens = torch.randn(16, 2, 272)
    random.seed(0)
    torch.manual_seed(0)
    got = trained.model.net_ad.add_jitter(tokens)
    random.seed(0)
    random.uniform(0, 1)
    torch.manual_seed(0)
    noise = torch.randn(16, 2, 272)
    torch.testing.assert_close(got, tokens + noise * tokens.norm(dim=2, keepdim=True) / 272 * 20.0)


def test_loss_is_the_mse_of_aligned_and_reconstructed_features(trained: ADTrainer, images) -> None:
    model = trained.model.eval()
    outputs = model(images)
    (align,), (rec,) = outputs
    assert align.shape == rec.shape == (2, 272, 4, 4) and not align.requires_grad
    terms = model.loss_terms(outputs, {"img": images}, FeatureMSELoss(weight=1.0))
    assert list(terms) == ["loss"]
    torch.testing.assert_close(terms["loss"], torch.nn.functional.mse_loss(rec, align))


def test_checkpoint_round_trip(trained: ADTrainer, tmp_path: Path, images) -> None:
    cfg = trained.cfg
    cfg.model.checkpoint = str(trained.run_dir / "net.pth")
    try:
        fresh = build_model(cfg, trained.log).eval()  # strict load through model.checkpoint
    finally:
        cfg.model.checkpoint = None
    want, want_scores = trained.model.eval().predict(images)
    got, got_scores = fresh.predict(images)
    assert torch.equal(got, want) and torch.equal(got_scores, want_scores)


def test_ader_state_dict_loads_strictly(trained: ADTrainer, tmp_path: Path, images) -> None:
    state = {"module." + k: v.clone() for k, v in trained.model.state_dict().items()}
    path = tmp_path / "ader_uniad.pth"
    torch.save({"net": state}, path)
    torch.manual_seed(1)
    fresh = UniAD(teacher=RANDOM_B4, image_size=64, score_pool=4, **QUIET)
    fresh.load_weights(path)
    fresh.eval()
    assert torch.equal(fresh.predict(images)[0], trained.model.eval().predict(images)[0])
    # ADer's names: MFCN and its upsampling hold no weights; everything else is timm's or net_ad's
    assert {k.split(".")[0] for k in state} == {"module"}
    assert {k.split(".")[1] for k in state} == {"net_backbone", "net_ad"}
    for key in (
        "net_ad.pos_embed.row_embed.weight",
        "net_ad.transformer.encoder.layers.3.self_attn.in_proj_weight",
        "net_ad.transformer.decoder.layers.3.learned_embed.weight",
        "net_ad.transformer.decoder.layers.0.multihead_attn.out_proj.bias",
        "net_ad.transformer.decoder.norm.weight",
        "net_ad.input_proj.weight",
        "net_ad.output_proj.bias",
        "net_backbone.blocks.6.0.conv_pwl.weight",  # the unused stride-32 stage is kept
    ):
        assert "module." + key in state, key


def test_paper_size_parameters_match_ader() -> None:
    model = UniAD(teacher=RANDOM_B4, image_size=256, **QUIET)
    counts = count_parameters(model)
    # ADer's 24.52 M: the whole timm feature model (16.74 M, with its stride-32 stages) + net_ad
    assert counts == {
        "backbone": 16_742_216,
        "transformer": 7_779_344,
        "total": 24_521_560,
        "trainable": 7_779_344,
    }
    assert round(counts["total"] / 1e6, 2) == 24.52
    dec = model.net_ad.transformer
    assert (len(dec.encoder.layers), len(dec.decoder.layers)) == (4, 4)
    assert dec.decoder.layers[0].learned_embed.weight.shape == (256, 256)  # 16x16 queries, 256 wide
    assert dec.mask.shape == (256, 256) and int(dec.mask[0].sum()) == 25  # corner: 5x5 of ADer's 9x9


def test_backbone_features_skip_only_unused_stages(trained: ADTrainer, images) -> None:
    backbone = trained.model.net_backbone
    with torch.no_grad():
        full, ours = backbone(images), extract_features(backbone, images)
    assert [f.shape[1] for f in ours] == [24, 32, 56, 160]
    assert all(torch.equal(a, b) for a, b in zip(full, ours, strict=True))


def test_neighbour_mask_hides_the_neighbourhood() -> None:
    mask = neighbour_mask((4, 4), (2, 2)).view(4, 4, 4, 4)
    assert mask[1, 1, :3, :3].all() and not mask[1, 1, 3, :].any() and not mask[1, 1, :, 3].any()
    assert mask[0, 0].sum() == 4  # clipped at the corner
    with pytest.raises(ValueError, match="masks the whole"):
        neighbour_mask((4, 4), (4, 4))


def test_config_is_aders_benchmark_and_checks_the_neighbour_size() -> None:
    cfg = UniADDefaults()
    cfg.derive()
    cfg.validate()
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.trainer.epochs) == (256, 8, 100)
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.weight_decay == 1e-4
    assert cfg.scheduler.milestones == [80] and cfg.trainer.grad_clip == 5.0
    assert (cfg.loss.type, cfg.loss.weight, cfg.model.score_pool) == ("feature_mse", 1.0, 16)
    with pytest.raises(ConfigError, match="neighbor_size"):
        load_config(Path("configs/uniad_demo.py"), ["model.neighbor_size=4"])
