"""The method contract (model/base.py): methods other than MambaAD train, resume and test with the
one trainer. Two toy methods stand in for the next issues' shapes: a reconstruction method with the
defaults (RD4AD, UniAD) and one with two optimisers of different types and two training stages
(SimpleNet's discriminator, DeSTSeg's stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import MODELS
from model.base import AnomalyModel, OptimizerSpec
from trainer.ad_trainer import ADTrainer
from util.checkpoint import load_file
from util.config import load_config

for _name, _cls in (("toy_reconstruction", "ToyReconstruction"), ("toy_two_stage", "ToyTwoStage")):
    if _name not in MODELS:
        MODELS.register_lazy(_name, f"tests.test_method_contract:{_cls}")

CONFIG = """
from configs.mambaad_demo import MambaADDemo
from util.config import Section


class ToyConfig(MambaADDemo):
    def __init__(self):
        super().__init__()
        self.model = Section(type="{type}", channels=4, checkpoint=None, image_size=None)

    def model_rules(self):
        return {{}}
"""


class ToyReconstruction(AnomalyModel):
    """A frozen encoder and a trained head; the config's loss compares them (every default hook)."""

    frozen_layers = ("encoder",)

    def __init__(self, channels: int = 4, image_size: Any = None, log: Any = print) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Conv2d(channels, channels, 1)
        self.train(True)

    def forward(self, imgs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            feats = self.encoder(imgs)
        return [feats], [self.head(feats)]

    @torch.no_grad()
    def predict(self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None):
        (t,), (s,) = self(imgs)
        maps = F.interpolate((t - s).pow(2).mean(1, keepdim=True), out_size or imgs.shape[-2:])[:, 0]
        return maps, maps.flatten(1).amax(1)


class ToyTwoStage(AnomalyModel):
    """Stage ``student`` (epoch 1) trains ``student`` with AdamW; stage ``head`` (later epochs)
    trains ``disc`` with Adam at its own learning rate, from a loss of its own."""

    frozen_layers = ("encoder",)

    def __init__(self, channels: int = 4, image_size: Any = None, log: Any = print) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, channels, 3, padding=1)
        self.student = nn.Conv2d(channels, channels, 1)
        self.disc = nn.Conv2d(channels, 1, 1)
        self.current = "student"
        self.entered: list[tuple[str, dict[str, torch.Tensor]]] = []
        self.train(True)

    def stage(self, epoch: int, epochs: int) -> str:
        return "student" if epoch == 1 else "head"

    def enter_stage(self, stage: str) -> None:
        self.current = stage
        self.entered.append((stage, {k: v.clone() for k, v in self.state_dict().items()}))
        for p in self.student.parameters():
            p.requires_grad_(stage == "student")
        for p in self.disc.parameters():
            p.requires_grad_(stage == "head")

    def optimizers(self, weight_decay: float, no_decay: str = "ader") -> list[OptimizerSpec]:
        return [
            OptimizerSpec("student", [{"params": list(self.student.parameters())}]),
            OptimizerSpec(
                "head",
                [{"params": list(self.disc.parameters())}],
                type="adam",
                options={"lr": 1e-3, "betas": (0.5, 0.999)},
            ),
        ]

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            feats = self.encoder(imgs)
        rec = self.student(feats)
        return feats, rec, self.disc(rec.detach() + torch.randn_like(rec) * 0.1)

    def loss_terms(self, outputs: Any, batch: Any, criterion: Any) -> dict[str, torch.Tensor]:
        feats, rec, logits = outputs
        if self.current == "student":
            return {"rec": (feats - rec).pow(2).mean()}
        return {"disc": F.softplus(logits).mean(), "rec_seen": (feats - rec).pow(2).mean().detach()}

    @torch.no_grad()
    def predict(self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None):
        _, _, logits = self(imgs)
        maps = F.interpolate(logits, out_size or imgs.shape[-2:])[:, 0]
        return maps, maps.flatten(1).amax(1)


def _config(tmp_path: Path, kind: str, *overrides: str):
    path = tmp_path / f"{kind}.py"
    path.write_text(CONFIG.format(type=kind))
    return load_config(
        path,
        [
            f"data.root={tmp_path / 'data'}",
            "data.synthetic_args.n_train=8",
            "data.synthetic_args.n_test_good=3",
            "data.synthetic_args.n_test_bad=3",
            "data.batch_size=4",
            "trainer.test_every=1",
            "scheduler.milestones=[5]",
            "device=cpu",
            f"output_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


def _train(cfg) -> ADTrainer:
    trainer = ADTrainer(cfg)
    trainer.train()
    return trainer


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "net.pth")


def test_two_optimisers_and_two_stages_train_with_the_one_trainer(tmp_path: Path) -> None:
    trainer = _train(_config(tmp_path, "toy_two_stage", "trainer.epochs=2"))
    model = trainer.model
    assert [stage for stage, _ in model.entered] == ["student", "head"]
    assert type(trainer.optimizers["student"]) is torch.optim.AdamW
    head = trainer.optimizers["head"]
    assert type(head) is torch.optim.Adam and head.defaults["betas"] == (0.5, 0.999)
    assert head.param_groups[0]["lr"] == pytest.approx(1e-3)
    (_, initial), (_, after_student) = model.entered
    final = model.state_dict()
    for key in ("student.weight", "disc.weight", "encoder.weight"):
        moved_in_student, moved_in_head = (
            not torch.equal(initial[key], after_student[key]),
            not torch.equal(after_student[key], final[key]),
        )
        assert (moved_in_student, moved_in_head) == {
            "student.weight": (True, False),  # each stage steps only its own optimiser's parameters
            "disc.weight": (False, True),
            "encoder.weight": (False, False),  # frozen
        }[key], key
    saved = load_file(trainer.run_dir / "ckpt.pth")
    assert set(saved["optimizers"]) == set(saved["schedulers"]) == {"student", "head"}
    assert (trainer.run_dir / "metrics.json").is_file()  # the test set was scored with predict


def test_a_resume_between_stages_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _train(_config(tmp_path, "toy_two_stage", "trainer.epochs=2"))
    first = _train(_config(tmp_path, "toy_two_stage", "trainer.epochs=1"))
    resumed = _train(
        _config(
            tmp_path,
            "toy_two_stage",
            "trainer.epochs=2",
            f"trainer.resume={first.run_dir}",
            "trainer.resume_changes=True",
        )
    )
    assert [stage for stage, _ in resumed.model.entered] == ["head"]  # re-entered on resume
    want, got = _weights(whole.run_dir), _weights(resumed.run_dir)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_checkpoints_with_one_unnamed_optimiser_still_resume(tmp_path: Path) -> None:
    # run folders written before named optimisers hold "optimizer"/"scheduler": the method's "main"
    whole = _train(_config(tmp_path, "toy_reconstruction", "trainer.epochs=2"))
    first = _train(_config(tmp_path, "toy_reconstruction", "trainer.epochs=1"))
    after_one = _weights(first.run_dir)  # the resume continues in this folder
    ckpt = first.run_dir / "ckpt.pth"
    state = load_file(ckpt)
    state["optimizer"] = state.pop("optimizers")["main"]
    state["scheduler"] = state.pop("schedulers")["main"]
    torch.save(state, ckpt)
    resumed = _train(
        _config(
            tmp_path,
            "toy_reconstruction",
            "trainer.epochs=2",
            f"trainer.resume={first.run_dir}",
            "trainer.resume_changes=True",
        )
    )
    assert resumed.optimizers["main"].state_dict()["state"]  # Adam moments came back
    want, got = _weights(whole.run_dir), _weights(resumed.run_dir)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    changed = [k for k in want if not torch.equal(want[k], after_one[k])]
    assert changed == ["head.weight", "head.bias"]  # the second epoch trained the head, nothing else
