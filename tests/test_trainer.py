"""Model building from configs and trainer-level behaviour that needs no training run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from model.build import build_model
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "model.depths=[2,2,2,2]",
    "model.teacher.name=resnet18",
    "data.image_size=64",
    "model.scan.directions=2",
]


def test_full_checkpoint_supplies_the_teacher_without_download(tmp_path: Path) -> None:
    log = logging.getLogger("test")
    source = build_model(load_config(REPO / "configs/mambaad_demo.py", SMALL), log)
    path = tmp_path / "net.pth"
    torch.save({"net": source.state_dict()}, path)
    # paper config: teacher.pretrained=True would need the internet; the checkpoint must win
    cfg = load_config(REPO / "configs/mambaad_mvtec.py", [*SMALL, f"model.checkpoint={path}"])
    assert cfg.model.teacher.pretrained is True
    model = build_model(cfg, log)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mismatched_checkpoint_names_the_keys_to_check(tmp_path: Path) -> None:
    log = logging.getLogger("test")
    source = build_model(load_config(REPO / "configs/mambaad_demo.py", SMALL), log)
    path = tmp_path / "net.pth"
    torch.save(source.state_dict(), path)
    cfg = load_config(
        REPO / "configs/mambaad_demo.py", [*SMALL[1:], "model.depths=[3,4,6,3]", f"model.checkpoint={path}"]
    )
    with pytest.raises(RuntimeError, match=r"does not match the configured model.*model\.depths"):
        build_model(cfg, log)
