"""DeSTSeg (model/destseg, configs/destseg_*.py): its losses against hand computations, two stages
trained by the one trainer on tiny generated data with procedural textures (which optimiser steps
when), maps and scores, a resume in the middle of the segmentation stage, checkpoints in ADer's
layout, the missing-DTD error of a paper config, and its size against Table 5."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import run
from model.base import CheckpointMismatchError
from model.destseg.loss import DeSTSegLoss, cosine_sum_loss, focal_loss
from model.destseg.network import DeSTSeg
from trainer.ad_trainer import ADTrainer
from util.checkpoint import load_file
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "destseg_demo.py"


def test_focal_loss_equals_a_hand_computation() -> None:
    probs = torch.tensor([0.9, 0.2, 0.5, 0.6])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # p_t (probability of the true class): 0.9, 0.8, 0.5, 0.4; BCE = -log(p_t)
    p_t = [0.9, 0.8, 0.5, 0.4]
    want = sum(-math.log(p) * (1 - p) ** 4 for p in p_t) / 4
    assert focal_loss(probs, targets).item() == pytest.approx(want, rel=1e-6)
    want_gamma0 = sum(-math.log(p) for p in p_t) / 4  # gamma 0: plain BCE
    assert focal_loss(probs, targets, gamma=0.0).item() == pytest.approx(want_gamma0, rel=1e-6)
    alphas = [0.25, 0.75, 0.25, 0.75]  # alpha for positives, 1 - alpha for negatives
    want_alpha = sum(a * -math.log(p) * (1 - p) ** 4 for a, p in zip(alphas, p_t)) / 4
    assert focal_loss(probs, targets, alpha=0.25).item() == pytest.approx(want_alpha, rel=1e-6)


def test_cosine_sum_and_stage_terms_equal_hand_computations() -> None:
    # two levels: [B=2, 1, 2, 2] of ones (sum 8 / (2*2) = 2) and [B=2, 1, 1, 2] holding 0..3 (6 / 2 = 3)
    maps = [torch.ones(2, 1, 2, 2), torch.arange(4.0).view(2, 1, 1, 2)]
    assert cosine_sum_loss(maps).item() == pytest.approx(2 + 3)
    loss = DeSTSegLoss(weight=2.0)
    assert loss.student(maps)["cos"].item() == pytest.approx(2 * 5)
    seg = torch.tensor([0.9, 0.2, 0.5, 0.6]).view(1, 1, 2, 2)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    terms = loss.segmentation(seg, mask)
    assert set(terms) == {"l1", "focal"}
    assert terms["l1"].item() == pytest.approx(2 * (0.1 + 0.2 + 0.5 + 0.6) / 4)
    assert terms["focal"].item() == pytest.approx(2 * focal_loss(seg, mask).item(), rel=1e-6)


def _config(tmp_path: Path, data: Path, *overrides: str):
    return load_config(
        DEMO,
        [
            f"data.root={data}",
            "data.synthetic=False",
            "data.image_size=64",
            "data.batch_size=4",
            "data.num_workers=1",  # a persistent worker: the epoch reaches it through shared memory
            "trainer.epochs=2",
            "model.student_fraction=0.5",  # epoch 1: student, epoch 2: segmentation
            "trainer.test_every=2",
            "trainer.save_every_steps=1",
            "trainer.keep_checkpoints=10",
            "trainer.log_every=1",
            "device=cpu",
            f"output_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ADTrainer:
    """DeSTSeg (random teacher, procedural textures) trained 2 epochs of 2 steps at 64x64."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    trainer = ADTrainer(_config(tmp_path_factory.mktemp("destseg"), tiny_data))
    trainer.train()
    return trainer


def _ckpt(trainer: ADTrainer, tag: str) -> dict:
    return load_file(trainer.run_dir / "checkpoints" / f"ckpt_{tag}.pth")


def _bn_means(state: dict, prefix: str) -> list[torch.Tensor]:
    return [v for k, v in state.items() if k.startswith(prefix) and k.endswith("running_mean")]


def test_each_stage_steps_its_own_sgd(trained: ADTrainer) -> None:
    student, seg = trained.optimizers["student"], trained.optimizers["segmentation"]
    assert type(student) is torch.optim.SGD and type(seg) is torch.optim.SGD
    lr = 0.005 * 4 / 16  # optim.base_lr x batch / 16
    assert [g["lr"] for g in student.param_groups] == pytest.approx([40 * lr, 40 * lr])
    assert [g["weight_decay"] for g in student.param_groups] == [0.0, 1e-4]  # 1-D and biases undecayed
    assert [g["lr"] for g in seg.param_groups] == pytest.approx([10 * lr, lr])  # residual stage, head
    assert [g["weight_decay"] for g in seg.param_groups] == [1e-4, 1e-4]
    assert all(g["momentum"] == 0.9 for o in (student, seg) for g in o.param_groups)
    after_student = _ckpt(trained, "e00001_b0000000")  # end of epoch 1 (the student stage)
    after_seg = _ckpt(trained, "e00002_b0000000")
    assert after_student["optimizers"]["student"]["state"]
    assert not after_student["optimizers"]["segmentation"]["state"]  # no step in the student stage
    assert after_seg["optimizers"]["segmentation"]["state"]
    assert (
        after_seg["optimizers"]["student"]["state"].keys()
        == after_student["optimizers"]["student"]["state"].keys()
    )
    for key, value in after_student["net"].items():  # the segmentation stage leaves the student alone
        if key.startswith(("net_s.", "decoder.", "net_t.")):
            assert torch.equal(after_seg["net"][key], value), key
    # in the student stage the segmentation network is in eval mode: its BatchNorm statistics stay
    # at their initial zeros; they move in its own stage
    assert all(not m.any() for m in _bn_means(after_student["net"], "segmentation_net."))
    assert any(m.any() for m in _bn_means(after_seg["net"], "segmentation_net."))
    assert not any(p.requires_grad for p in trained.model.net_s.parameters())  # frozen by the stage
    aders = SimpleNamespace(student_fraction=0.2)  # ADer: 0-based epoch < 100 / 5 trains the student
    assert DeSTSeg.stage(aders, 20, 100) == "student" and DeSTSeg.stage(aders, 21, 100) == "segmentation"
    assert trained.model.stage(1, 2) == "student" and trained.model.stage(2, 2) == "segmentation"


def test_maps_and_scores(trained: ADTrainer) -> None:
    model = trained.model.eval()
    imgs = next(iter(trained.test_loader))["img"][:3]
    maps, scores = model.predict(imgs)
    assert maps.shape == (3, 64, 64) and scores.shape == (3,)
    assert ((maps >= 0) & (maps <= 1)).all()  # a sigmoid output
    # at the segmentation output's own size (stride 4) the map is that output, so the score (the
    # mean of its 100 highest of 16 x 16 values) can be recomputed from the map
    native, native_scores = model.predict(imgs, (16, 16))
    assert torch.allclose(native_scores, native.flatten(1).topk(100).values.mean(1), rtol=0, atol=1e-6)
    model.score_top_k = 1
    assert torch.equal(model.predict(imgs, (16, 16))[1], native.flatten(1).amax(1))
    model.score_top_k = 100
    seg, *_ = model(imgs)  # ADer's forward: the same segmentation output
    assert torch.allclose(seg[:, 0], native, rtol=0, atol=1e-6)


def test_a_resume_inside_the_segmentation_stage_equals_the_whole_run(
    trained: ADTrainer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "interrupted"
    shutil.copytree(trained.run_dir, run_dir, ignore=shutil.ignore_patterns("tb", "*.lock"))
    # the checkpoint after the first batch of epoch 2: mid-epoch, mid-stage
    shutil.copy(run_dir / "checkpoints" / "ckpt_e00001_b0000001.pth", run_dir / "ckpt.pth")
    (run_dir / "metrics.json").unlink(missing_ok=True)
    resumed = ADTrainer(_config(tmp_path, Path(trained.cfg.data.root), f"trainer.resume={run_dir}"))
    resumed.train()
    want, got = load_file(trained.run_dir / "net.pth"), load_file(run_dir / "net.pth")
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _ader_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as ADer's DESTSEG names it: net_t/net_s, their second copies under destseg.,
    destseg.student_net.decoder_layer*, destseg.segmentation_net (keys of ADer's model/destseg.py)."""
    out = {}
    for key, value in state.items():
        if key.startswith("net_t."):
            out[key] = out["destseg.teacher_net.encoder." + key[6:]] = value
        elif key.startswith("net_s."):
            out[key] = out["destseg.student_net.encoder." + key[6:]] = value
        elif key.startswith("decoder."):
            out["destseg.student_net." + key[8:]] = value
        else:
            out["destseg." + key] = value
    return out


def test_checkpoints_in_aders_layout_load_with_identical_maps(trained: ADTrainer, tmp_path: Path) -> None:
    model = trained.model.eval()
    imgs = next(iter(trained.test_loader))["img"][:2]
    want, want_scores = model.predict(imgs)
    state = model.state_dict()
    ader = tmp_path / "ader_ckpt.pth"
    torch.save({"net": {f"module.{k}": v for k, v in _ader_layout(state).items()}}, ader)
    fresh = DeSTSeg(teacher={"name": "resnet18", "pretrained": False}, log=lambda s: None)
    fresh.load_weights(ader)
    fresh.eval()
    maps, scores = fresh.predict(imgs)
    assert torch.equal(maps, want) and torch.equal(scores, want_scores)
    ours = tmp_path / "ours.pth"
    torch.save(state, ours)
    fresh.load_weights(ours)
    damaged = _ader_layout(state)
    damaged["destseg.teacher_net.encoder.conv1.weight"] = damaged["net_t.conv1.weight"] + 1
    torch.save({"net": damaged}, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointMismatchError, match=r"differs from net_t\.conv1\.weight"):
        fresh.load_weights(tmp_path / "damaged.pth")
    partial = tmp_path / "partial.pth"
    torch.save(
        {"net": {"destseg.segmentation_net.head.4.bias": state["segmentation_net.head.4.bias"]}}, partial
    )
    with pytest.raises(CheckpointMismatchError, match=r"Missing key\(s\)"):
        fresh.load_weights(partial)


def test_parameter_count_against_table_5(trained: ADTrainer) -> None:
    counts = trained.model.parameter_counts()
    # ResNet18 up to layer3 (2.78 M) + a full ResNet18 encoder without fc (11.18 M) + the decoder
    # + the segmentation network; Table 5: 35.2 M
    assert counts["teacher"] == 2_782_784 and counts["student_encoder"] == 11_176_512
    assert counts["total"] == sum(
        counts[k] for k in ("teacher", "student_encoder", "student_decoder", "segmentation")
    )
    assert abs(counts["total"] / 1e6 - 35.2) / 35.2 < 0.05
    assert counts["trainable"] == counts["segmentation"]  # the segmentation stage froze the student


def test_a_paper_config_without_dtd_stops_with_one_paragraph(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "-c",
        str(REPO / "configs" / "destseg_mvtec.py"),
        f"data.root={tiny_data}",
        f"data.anomaly_source.root={tmp_path / 'no_dtd'}",
        "model.teacher.pretrained=False",
        "device=cpu",
        f"output_dir={tmp_path / 'runs'}",
    ]
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"data.anomaly_source.root={tmp_path / 'no_dtd'}" in err
    assert "https://www.robots.ox.ac.uk/~vgg/data/dtd/" in err and "--dataset dtd" in err
    assert "procedural" not in err.lower()  # never a silent fallback
    assert len([line for line in err.strip().splitlines() if line.strip()]) == 1


def test_configs_carry_aders_benchmark_settings() -> None:
    for name in ("mvtec", "visa", "medical", "realiad"):
        cfg = load_config(REPO / "configs" / f"destseg_{name}.py", [])
        assert cfg.data.type == "SynthesizedAD" and cfg.data.anomaly_source.type == "dtd"
        assert cfg.data.anomaly_source.seed == cfg.seed == 42
        assert (cfg.data.image_size, cfg.data.batch_size, cfg.trainer.epochs) == (256, 32, 100)
        assert cfg.optim.type == "sgd" and cfg.optim.lr == pytest.approx(0.01)  # ADer: 0.01 x 32 / 32
        assert cfg.scheduler.milestones == [] and cfg.trainer.grad_clip == 5.0
        assert cfg.model.teacher.name == "resnet18.tv_in1k" and cfg.loss.focal_gamma == 4.0
    demo = load_config(DEMO, [])
    assert demo.data.anomaly_source.type == "procedural"


def test_flops_count_every_segmentation_convolution() -> None:
    from tools.flops import model_flops

    torch.manual_seed(0)
    model = DeSTSeg(teacher={"name": "resnet18", "pretrained": False}, log=lambda s: None)
    flops = model_flops(model, 64)
    positions = 16 * 16  # the segmentation network runs at stride 4
    c, k = 256, 9  # width, 3x3 kernel
    res = 448 * c * k + c * c * k + 448 * c + 2 * c * c * k  # two BasicBlocks, the first with a 1x1 shortcut
    # three dilated 3x3 branches, the 4 x 256 -> 256 3x3 fusion (padding "same", which fvcore's
    # tracer skips), the 3x3 conv and the 1x1 output conv
    head = 3 * c * c * k + 4 * c * c * k + c * c * k + c
    norms = 2 * (5 + 3 + 1 + 1) * c * positions + 2 * c  # eval BatchNorm: 2 per element (+ the pooled branch)
    assert flops["segmentation"] == (res + head) * positions + c * c + norms
    # ADer's forward at test time runs the teacher on the image and on its copy
    assert flops["total"] == sum(
        flops[p] for p in ("teacher", "student_encoder", "student_decoder", "segmentation")
    )


def test_trains_through_the_stage_switch_on_two_gloo_ranks(tiny_data: Path, tmp_path: Path) -> None:
    # each stage trains another part: DDP reduces the parameters that required gradients when
    # it was built, so the trainer rebuilds it when enter_stage changes them (with the first
    # wrapper kept, the segmentation stage stops: "Expected to have finished reduction")
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py"]
    cmd += ["-c", str(DEMO), f"data.root={tiny_data}", "data.synthetic=False", "data.image_size=64"]
    cmd += ["data.batch_size=4", "data.num_workers=0", "trainer.epochs=2", "model.student_fraction=0.5"]
    cmd += ["trainer.test_every=2", "device=cpu", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = next(out.glob("*/log.txt")).read_text()
    assert "epoch 1: training stage student" in log and "epoch 2: training stage segmentation" in log
    assert "each scored once by 2 process(es)" in log
