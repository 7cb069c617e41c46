"""The paper's teacher weights and optimiser, as the authors' code ran them (no download needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml

from model.mambaad.network import MambaAD
from model.teacher import AUTHORS_TEACHER_TAGS, build_teacher, resolve_weights
from trainer.optim import OPTIMIZERS
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
QUIET = {"log": lambda s: None}

# The weights file each authors' config loads for a timm teacher (github lewandofskee/MambaAD
# configs/mambaad/*.py and zhangzjn/ADer configs: checkpoint_path='model/pretrain/<file>'), and the
# file timm 1.0 fetches for the same tensors. resnet18-5c106cde.pth was re-saved by torchvision as
# resnet18-f37072fd.pth (pytorch/vision#2068). No authors' config names a ResNet50 file: their timm's
# plain 'resnet50' loaded resnet50_a1_0-14fe96d1.pth.
AUTHORS_FILES = {
    "resnet18": ("resnet18.tv_in1k", "resnet18-f37072fd.pth"),
    "resnet34": ("resnet34.bt_in1k", "resnet34-43635321.pth"),
    "resnet50": ("resnet50.a1_in1k", "resnet50_a1_0-14fe96d1.pth"),
    "wide_resnet50_2": ("wide_resnet50_2.racm_in1k", "wide_resnet50_racm-8234f177.pth"),
}


def _paper_teacher_names() -> list[str]:
    """Every teacher a paper config or a sweep grid names."""
    names = {
        load_config(path).model.teacher.name
        for path in sorted((REPO / "configs").glob("mambaad_*.py"))
        if path.stem != "mambaad_demo"
    }
    for grid in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        for row in yaml.safe_load(grid.read_text()).get("rows", []):
            if "model.teacher.name" in row:
                names.add(row["model.teacher.name"])
    return sorted(names)


def test_every_paper_teacher_resolves_to_the_authors_weights() -> None:
    names = _paper_teacher_names()
    assert {n.split(".")[0] for n in names} == set(AUTHORS_FILES)  # Table 2: four backbones
    for name in names:
        teacher = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), pretrained=False)
        cfg = teacher.pretrained_cfg
        tag, file = AUTHORS_FILES[cfg["architecture"]]
        assert f"{cfg['architecture']}.{cfg['tag']}" == tag, name
        assert cfg["url"].rsplit("/", 1)[-1] == file, name
        assert resolve_weights(name) == (tag, file)
        assert AUTHORS_TEACHER_TAGS[cfg["architecture"]] == tag.split(".", 1)[1]


def test_plain_name_resolves_elsewhere_and_is_called_out(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_weights("resnet34") == ("resnet34.a1_in1k", "resnet34_a1_0-46f8f793.pth")
    with pytest.raises(RuntimeError, match=r"tag \(nope\)"):
        resolve_weights("resnet34.nope")
    real_create = timm.create_model

    def no_download(*args, **kwargs):  # stands in for a download: random weights, same pretrained_cfg
        kwargs["pretrained"] = False
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    logs: list[str] = []
    build_teacher("resnet34", pretrained=True, log=logs.append)
    assert any("resnet34.a1_in1k (resnet34_a1_0-46f8f793.pth)" in s for s in logs), logs
    assert any("model.teacher.name=resnet34.bt_in1k" in s for s in logs), logs
    logs.clear()
    build_teacher("resnet34.bt_in1k", pretrained=True, log=logs.append)
    assert logs == ["teacher: timm pretrained weights resnet34.bt_in1k (resnet34-43635321.pth)"]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("resnet18", r"'resnet34': first mismatching key layer1\.2\.conv1\.weight: missing from the file"),
        (
            "resnet50",
            r"'resnet34': first mismatching key layer1\.0\.conv1\.weight: shape \(64, 64, 1, 1\) in the "
            r"file, \(64, 64, 3, 3\) in the model",
        ),
    ],
)
def test_checkpoint_of_another_backbone_names_file_and_first_key(
    tmp_path: Path, source: str, expected: str
) -> None:
    path = tmp_path / f"{source}_weights.pth"
    torch.save(timm.create_model(source, pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=expected) as err:
        build_teacher("resnet34.bt_in1k", checkpoint=path, **QUIET)
    assert str(path) in str(err.value)


def test_checkpoint_with_extra_tensor_names_it(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state["layer2.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layer2\.0\.extra\.weight: in the file but not in the model"):
        build_teacher("resnet18", checkpoint=path, **QUIET)


@pytest.mark.parametrize("no_decay", ["ader", "flagged"])
def test_trainer_optimizer_follows_optim_no_decay(no_decay: str) -> None:
    cfg = load_config(REPO / "configs/mambaad_demo.py", [f"optim.no_decay={no_decay}"])
    torch.manual_seed(0)
    model = MambaAD(teacher="resnet18", depths=(2, 2, 2, 2), scan={"directions": 2}, image_size=64, **QUIET)
    (spec,) = model.optimizers(cfg.optim.weight_decay, no_decay=cfg.optim.no_decay)  # as the trainer
    optimizer = OPTIMIZERS.build(spec.type or cfg.optim.type, spec.groups, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    a_logs = "net_s.layers_up.1.blocks.0.smm_blocks.0.self_attention.A_logs"
    assert (a_logs in decayed) == (no_decay == "ader")
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        len(g["params"]) for g in model.parameter_groups(1e-4, no_decay=no_decay)
    ]
