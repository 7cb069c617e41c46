"""The authors' checkpoint layouts (spec section 7) load strictly, with a report of what changed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from model.build import build_model
from model.mambaad.network import MambaAD
from model.mambaad.official import convert_state_dict, load_weights
from model.mambaad.scan_orders import direction_permutations
from tests.test_model import _expected_lss_convs, _expected_ss2d
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
DIMS, DEPTHS, SIZES = (512, 256, 128, 64), (3, 4, 6, 3), (8, 16, 32, 64)
LAYOUT = {3: (1, 3), 4: (2, 2), 6: (2, 3)}  # stage depth -> (LSS modules, HSS blocks each)


def official_decoder_shapes(naming: str) -> dict[str, tuple[int, ...]]:
    """``net_s`` keys and shapes of the paper model as the authors' files store them.

    ``naming="ader"``: ``conv1b3``/``conv1a3`` + unused ``conv33``; ``"mambaad"``: the MambaAD
    repository's ``conv1b7``/``conv1a7`` and no ``conv33``.
    """
    out: dict[str, tuple[int, ...]] = {}
    for i, (dim, depth, size) in enumerate(zip(DIMS, DEPTHS, SIZES, strict=True)):
        stage = f"net_s.layers_up.{i}."
        if i:
            out[stage + "upsample.expand.weight"] = (4 * dim, 2 * dim)
            out[stage + "upsample.norm.weight"] = (dim,)
            out[stage + "upsample.norm.bias"] = (dim,)
        n_modules, per_module = LAYOUT[depth]
        for j in range(n_modules):
            lss = f"{stage}blocks.{j}."
            for m in range(per_module):
                blk = f"{lss}smm_blocks.{m}."
                out[blk + "ln_1.weight"] = (dim,)
                out[blk + "ln_1.bias"] = (dim,)
                for key, shape in _expected_ss2d(dim, size).items():
                    out[blk + "self_attention." + key] = shape
            for key, shape in _expected_lss_convs(dim).items():
                if naming == "mambaad":
                    if key.startswith("conv33."):
                        continue
                    key = key.replace("conv1b3.", "conv1b7.").replace("conv1a3.", "conv1a7.")
                out[lss + key] = shape
    return out


@pytest.fixture(scope="module")
def paper_model() -> MambaAD:
    torch.manual_seed(0)
    return MambaAD(log=lambda s: None)


def official_state(model: MambaAD, naming: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights in the official layout; teacher/bottleneck keys as ours (same names)."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items() if k[:6] != "net_s."
    }
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v.clone()
    for key, shape in official_decoder_shapes(naming).items():
        if key.endswith(".scans.index_flat") or key.endswith(".scans.index_flat_inv"):
            size = int(shape[-1] ** 0.5)
            base = direction_permutations("hilbert", size, size, 8)[0]
            value = base if key.endswith("index_flat") else torch.argsort(base)
            state[key] = value.reshape(shape).clone()
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


def _ours(key: str) -> str:
    return key.replace(".conv1b7.", ".conv1b3.").replace(".conv1a7.", ".conv1a3.")


def test_official_layout_is_ours(paper_model: MambaAD) -> None:
    ours = {k: tuple(v.shape) for k, v in paper_model.state_dict().items() if k.startswith("net_s.")}
    assert ours == official_decoder_shapes("ader")


@pytest.mark.parametrize("naming", ["ader", "mambaad"])
@pytest.mark.parametrize("wrapper", ["bare", "net", "ckpt"])
def test_official_checkpoints_load_strictly(
    paper_model: MambaAD, naming: str, wrapper: str, tmp_path: Path
) -> None:
    state = official_state(paper_model, naming)
    if wrapper == "net":
        obj = {"net": state}
    elif wrapper == "ckpt":  # ADer's ckpt.pth, saved from a DataParallel model
        obj = {"net": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "epoch": 500}
    else:
        obj = state
    path = tmp_path / "mambaad_mvtec.pth"
    torch.save(obj, path)
    lines: list[str] = []
    report = load_weights(paper_model, path, log=lines.append)

    loaded = paper_model.state_dict()
    for key, value in state.items():  # every official tensor is used, under our name
        assert torch.equal(loaded[_ours(key)], value.to(loaded[_ours(key)].dtype)), key
    assert not report.unused and not report.unexpected and not report.missing
    n_lss = 1 + 2 + 2 + 1
    if naming == "mambaad":
        assert len(report.renamed) == 2 * 2 * n_lss  # conv1b7/conv1a7 weight + bias per LSS module
        assert all(".conv33." in k for k in report.kept) and len(report.kept) == n_lss
        assert "conv1b7->conv1b3" in lines[0] and "conv33.*.weight (6)" in lines[0]
    else:
        assert not report.renamed and not report.kept
        assert "renamed none" in lines[0] and "unused none" in lines[0]
    assert str(path) in lines[0]


def test_conv33_is_the_only_unused_key_for_a_model_without_it(paper_model: MambaAD) -> None:
    state = official_state(paper_model, "ader")
    target = {k: v for k, v in paper_model.state_dict().items() if ".conv33." not in k}
    converted, report = convert_state_dict(state, target)
    assert report.ok and converted.keys() == target.keys()
    assert report.unused and all(".conv33." in k for k in report.unused)


def test_wrong_scan_order_is_refused(paper_model: MambaAD, tmp_path: Path) -> None:
    state = official_state(paper_model, "ader")
    key = "net_s.layers_up.2.blocks.0.smm_blocks.0.self_attention.scans.index_flat"
    state[key] = direction_permutations("zigzag", 32, 32, 8)[0].reshape(1, 1, -1)
    path = tmp_path / "zigzag.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"zigzag\.pth.*index_flat.*model\.scan\.method"):
        load_weights(paper_model, path)


def test_unknown_and_missing_keys_are_named(paper_model: MambaAD) -> None:
    state = official_state(paper_model, "ader")
    state["net_s.layers_up.0.blocks.0.extra.weight"] = torch.zeros(1)
    del state["net_s.layers_up.3.blocks.0.finalconv11.weight"]
    _, report = convert_state_dict(state, paper_model.state_dict())
    assert report.unexpected == ["net_s.layers_up.0.blocks.0.extra.weight"]
    assert report.missing == ["net_s.layers_up.3.blocks.0.finalconv11.weight"]
    assert not report.ok


def test_build_model_loads_an_official_file_for_test_and_training(tmp_path: Path) -> None:
    """Small model in the MambaAD-repo naming: -m test / predict / training init all use build_model."""
    small = ["model.depths=[2,2,2,2]", "model.teacher.name=resnet18", "data.image_size=64"]
    log = logging.getLogger("test_official")
    source = build_model(load_config(REPO / "configs/mambaad_demo.py", small), log)
    state = {
        k.replace(".conv1b3.", ".conv1b7.").replace(".conv1a3.", ".conv1a7."): v
        for k, v in source.state_dict().items()
        if ".conv33." not in k
    }
    path = tmp_path / "official.pth"
    torch.save({"net": state}, path)
    cfg = load_config(REPO / "configs/mambaad_mvtec.py", [*small, f"model.checkpoint={path}"])
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        model = build_model(cfg, log)
    finally:
        log.removeHandler(handler)
    for key, value in source.state_dict().items():
        if ".conv33." not in key:
            assert torch.equal(model.state_dict()[key], value), key
    assert any("renamed 8 x conv1a7->conv1a3, 8 x conv1b7->conv1b3" in m for m in messages)
