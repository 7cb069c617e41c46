"""tools/flops.py: fvcore-style counting rules and the paper's Table 2 figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from model.mambaad.decoder import MambaDecoder
from model.mambaad.network import MambaAD
from model.mambaad.ss2d import SS2D
from tools.flops import _count, main, measure, model_flops, selective_scan_flops
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_layers_count_multiply_adds_and_fvcore_norms() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8*3*9 MACs per output pixel
        nn.BatchNorm2d(8),  # eval: 2 per element
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # depth-wise: 25 MACs per output element
        nn.InstanceNorm2d(8),  # no affine: 4 per element
    ).eval()
    x = torch.randn(1, 3, 10, 10)
    flops, scan, _ = _count(net, lambda: net(x))
    pixels = 10 * 10
    assert scan == 0
    assert flops == pixels * (8 * 3 * 9) + 2 * 8 * pixels + 25 * 8 * pixels + 4 * 8 * pixels

    lin = nn.Sequential(nn.Linear(16, 32, bias=False), nn.LayerNorm(32))
    flops, _, _ = _count(lin, lambda: lin(torch.randn(2, 5, 16)))
    assert flops == 10 * 16 * 32 + 5 * 10 * 32


def test_selective_scan_counted_analytically() -> None:
    assert selective_scan_flops(1, 64, 8192, 16) == 9 * 64 * 8192 * 16 + 64 * 8192
    assert selective_scan_flops(2, 10, 4, 16, with_d=False) == 9 * 2 * 10 * 4 * 16
    torch.manual_seed(0)
    dec = MambaDecoder(
        dims=(64, 32, 16, 8), depths=(2, 2, 2, 2), scan={"directions": 4}, image_size=64
    ).eval()
    _, scan, out = _count(dec, lambda: dec(torch.randn(1, 64, 2, 2)))
    expected = 0
    for i, layer in enumerate(dec.layers_up):
        for module in layer.blocks:
            for blk in module.smm_blocks:
                ss2d: SS2D = blk.self_attention
                length = (2 * 2**i) ** 2
                expected += selective_scan_flops(1, length, 4 * ss2d.d_inner, ss2d.d_state)
    assert scan == expected
    assert [o.shape[-1] for o in out] == [16, 8, 4]


def _model(scan: dict | None = None, bottleneck: dict | None = None) -> MambaAD:
    torch.manual_seed(0)
    teacher = {"name": "resnet18", "pretrained": False}
    scan = scan or {"directions": 4}
    kwargs = {"depths": (2, 2, 2, 2), "image_size": 64, "log": lambda *a: None}
    return MambaAD(teacher=teacher, scan=scan, bottleneck=bottleneck, **kwargs)


def test_grouped_and_fuser_scans_are_counted() -> None:
    """Grouped scanning scans d_inner instead of K*d_inner channels; the dilated fuser's scans count."""
    base = model_flops(_model(), 64)
    grouped = model_flops(_model(scan={"directions": 4, "grouped": True}), 64)
    assert grouped["scan"] * 4 == pytest.approx(base["scan"], rel=1e-9)
    fused = model_flops(_model(bottleneck={"type": "dilated_mamba", "dilations": [1, 2]}), 64)
    side, d_inner = 64 // 16, 2 * 256
    blocks = 2 * selective_scan_flops(1, side * side, 4 * d_inner, 16)  # 2 rates, 4 directions
    assert fused["scan"] == base["scan"] + blocks


@pytest.mark.parametrize(
    "overrides, params, gflops",
    [
        ([], 25.7, 8.3),  # paper Table 2 / 5, the default model
        (["model.teacher.name=resnet18", "model.depths=[2,2,2,2]"], 14.6, 4.3),
    ],
)
def test_paper_table2_figures(overrides: list[str], params: float, gflops: float) -> None:
    cfg = load_config(REPO / "configs/mambaad_mvtec.py", overrides)
    assert cfg.model.teacher.pretrained  # forced off by measure(): no download
    result = measure(cfg)
    assert result["params_m"]["total"] == pytest.approx(params, rel=0.02)
    assert result["gflops"]["total"] == pytest.approx(gflops, rel=0.02)
    g = result["gflops"]
    assert g["total"] == pytest.approx(g["teacher"] + g["bottleneck"] + g["decoder"])
    assert g["total_with_scan"] == pytest.approx(g["total"] + g["scan"])
    assert g["scan"] > 0
    if not overrides:
        assert g["teacher"] == pytest.approx(3.96, rel=0.02)


def test_flops_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["-c", str(REPO / "configs/mambaad_demo.py"), "--json", "model.teacher.name=resnet18"]
    assert main([*args, "model.depths=[2,2,2,2]", "model.scan.directions=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["gflops"]) == {"total", "teacher", "bottleneck", "decoder", "scan", "total_with_scan"}
    assert result["params_m"]["teacher"] == pytest.approx(2.78, abs=0.01)  # resnet18 stages 1-3
    # 64x64 input: the teacher's convolutions scale with the pixel count (1/16 of 256x256)
    assert result["gflops"]["teacher"] == pytest.approx(1.84 / 16, rel=0.02)


def test_model_flops_scale_with_input_size() -> None:
    from model.mambaad.network import MambaAD

    torch.manual_seed(0)
    model = MambaAD(
        teacher="resnet18", depths=(2, 2, 2, 2), scan={"directions": 2}, image_size=64, log=lambda s: None
    )
    small = model_flops(model, 64)
    large = model_flops(model, 128)
    assert large["teacher"] == pytest.approx(4 * small["teacher"], rel=0.01)
    assert large["scan"] == 4 * small["scan"]


@pytest.mark.parametrize(
    "config, params, gflops, parts",
    [
        ("configs/rd4ad_mvtec.py", 80.6, 28.4, ("teacher", "bottleneck", "decoder")),
        ("configs/uniad_mvtec.py", 24.5, 3.6, ("net_backbone", "net_merge", "net_ad")),
        ("configs/simplenet_mvtec.py", 72.8, 16.1, ("backbone", "adaptor", "discriminator")),
    ],
)
def test_paper_table5_figures_of_the_other_methods(
    config: str, params: float, gflops: float, parts: tuple[str, ...]
) -> None:
    result = measure(load_config(REPO / config))
    assert result["params_m"]["total"] == pytest.approx(params, rel=0.03)
    assert result["gflops"]["total"] == pytest.approx(gflops, rel=0.03)
    # every operation is counted in one part (UniAD's backbone runs through its submodules)
    assert sum(result["gflops"][p] for p in parts) == pytest.approx(result["gflops"]["total"], rel=1e-9)
    assert min(result["gflops"][p] for p in parts if p != "net_merge") > 0
