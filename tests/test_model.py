"""Tests for the MambaAD model: shapes, sizes, freezing, optimiser groups, checkpoint layout."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from configs.defaults import MambaADDefaults
from model.mambaad.decoder import LSSModule, MambaDecoder, drop_path_schedule, lss_layout
from model.mambaad.hfpn import HalfFPN
from model.mambaad.network import MambaAD, count_parameters
from model.mambaad.scan_orders import ScanOptions, direction_permutations
from model.mambaad.ss2d import SS2D
from model.teacher import build_teacher, calibrate_batchnorm
from tests.scan_helpers import assert_close_rel, ss2d_bounds
from util.config import ConfigError, load_config

QUIET = {"log": lambda s: None}
TINY = {"depths": (2, 2, 2, 2), "scan": {"directions": 2, "method": "sweep"}, "image_size": 64}


@pytest.fixture(scope="module")
def paper_model() -> MambaAD:
    torch.manual_seed(0)
    return MambaAD(**QUIET)


@pytest.fixture(scope="module")
def tiny_model() -> MambaAD:
    torch.manual_seed(0)
    return MambaAD(teacher="resnet18", **TINY, **QUIET)


def test_output_shapes_match_teacher(tiny_model: MambaAD) -> None:
    ft, fs = tiny_model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in ft] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert [f.shape for f in fs] == [f.shape for f in ft]
    assert all(torch.isfinite(f).all() for f in fs)


def test_shapes_when_input_differs_from_construction_size() -> None:
    torch.manual_seed(0)
    model = MambaAD(teacher="resnet18", depths=(2, 2, 2, 2), scan={"directions": 4}, image_size=128, **QUIET)
    model.eval()
    with torch.no_grad():
        ft, fs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in fs] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]
    assert [f.shape for f in fs] == [f.shape for f in ft]
    scans = model.net_s.layers_up[3].blocks[0].smm_blocks[0].self_attention.scans
    assert scans.index_flat.shape == (1, 1, 32 * 32)
    assert scans.permutations(16, 16, torch.device("cpu")).shape == (4, 16 * 16)


@pytest.mark.parametrize("bottleneck", ["hfpn", "dilated_mamba"])
def test_a_non_square_input_size_builds_the_model_for_height_and_width(bottleneck: str) -> None:
    torch.manual_seed(0)
    extra = {"bottleneck": {"type": bottleneck, "dilations": [1, 2]}} if bottleneck != "hfpn" else {}
    model = MambaAD(
        teacher="resnet18", depths=(2, 2, 2, 2), scan={"directions": 2}, image_size=[64, 96], **extra, **QUIET
    ).eval()
    scans = model.net_s.layers_up[3].blocks[0].smm_blocks[0].self_attention.scans
    assert scans.size == (16, 24) and scans.index_flat.shape == (1, 1, 16 * 24)
    assert scans.perms.shape == (2, 16 * 24) and "size=16x24" in repr(scans)
    with torch.no_grad():
        maps, scores = model.predict(torch.randn(2, 3, 64, 96))
    assert maps.shape == (2, 64, 96) and scores.shape == (2,) and torch.isfinite(maps).all()


@pytest.mark.parametrize("size", [80, 32, [64, 80], [64], [64, 64, 64], "64", True, [64.0, 64]])
def test_the_input_size_rule_is_one_rule(size: object) -> None:
    # the config check, the model and the export apply the same rule (model/input_size.py)
    from deploy.export import ExportError, check_image_size
    from model.input_size import RULE, input_hw, valid_input_size

    assert not valid_input_size(size)
    with pytest.raises(ValueError, match=r"data\.image_size must be a multiple of 32 of at least 64"):
        MambaDecoder(dims=(32, 16, 8, 4), depths=(2, 2, 2, 2), image_size=size)
    cfg = load_config("configs/mambaad_demo.py")
    cfg.data.image_size = size  # as a config class may set it
    with pytest.raises(ConfigError, match=re.escape(RULE)):
        cfg.validate()
    if isinstance(size, int) and not isinstance(size, bool):
        with pytest.raises(ExportError, match="--image-size must be"):
            check_image_size(size)
    assert input_hw(64) == (64, 64) and input_hw([64, 96]) == (64, 96) and input_hw((128, 64)) == (128, 64)


def test_paper_parameter_counts(paper_model: MambaAD) -> None:
    counts = count_parameters(paper_model)
    assert abs(counts["total"] / 1e6 - 25.7) < 0.1
    assert abs(counts["total"] / 1e6 - 25.67) < 0.005
    assert abs(counts["teacher"] / 1e6 - 8.17) < 0.01
    no_idx = count_parameters(paper_model, include_index_buffers=False)
    # 16 HSS blocks at 8/16/32/64 px (3, 4, 6, 3 blocks), two [1, 1, L] buffers each.
    n_index = 2 * (3 * 8**2 + 4 * 16**2 + 6 * 32**2 + 3 * 64**2)
    assert counts["total"] - no_idx["total"] == n_index
    assert counts["decoder"] - no_idx["decoder"] == n_index
    assert no_idx["trainable"] == no_idx["bottleneck"] + no_idx["decoder"]
    assert counts["total"] == counts["teacher"] + counts["bottleneck"] + counts["decoder"]


def test_teacher_frozen_and_stays_eval(tiny_model: MambaAD) -> None:
    tiny_model.train()
    assert tiny_model.training and tiny_model.net_s.training and tiny_model.mff_oce.training
    assert not tiny_model.net_t.training
    assert not any(m.training for m in tiny_model.net_t.modules())
    assert not any(p.requires_grad for p in tiny_model.net_t.parameters())
    tiny_model.eval()
    assert not tiny_model.net_s.training


def test_gradients_reach_student_not_teacher(tiny_model: MambaAD) -> None:
    tiny_model.train()
    tiny_model.zero_grad(set_to_none=True)
    ft, fs = tiny_model(torch.randn(1, 3, 64, 64))
    assert all(not f.requires_grad for f in ft)
    sum(F.mse_loss(s, t) for s, t in zip(fs, ft)).backward()
    assert all(p.grad is None for p in tiny_model.net_t.parameters())
    assert tiny_model.mff_oce.conv1.weight.grad is not None
    assert tiny_model.mff_oce.conv1.weight.grad.abs().sum() > 0
    ss2d = tiny_model.net_s.layers_up[1].blocks[0].smm_blocks[0].self_attention
    for p in (ss2d.A_logs, ss2d.x_proj_weight, ss2d.dt_projs_bias, ss2d.in_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    tiny_model.eval()


def test_teacher_bn_stats_unchanged_by_training_forward(tiny_model: MambaAD) -> None:
    tiny_model.train()
    before = tiny_model.net_t.bn1.running_mean.clone()
    tiny_model(torch.randn(1, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, tiny_model.net_t.bn1.running_mean)
    tiny_model.eval()


def _group_names(model: MambaAD, no_decay: str) -> tuple[set[str], set[str]]:
    decay, undecayed = model.parameter_groups(1e-4, no_decay=no_decay)
    assert decay["weight_decay"] == 1e-4 and undecayed["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in undecayed["params"]}
    assert not dec & nod
    assert dec | nod == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("net_t.") for n in dec | nod)
    return dec, nod


_PRE = "net_s.layers_up.1.blocks.0."
_SA = _PRE + "smm_blocks.0.self_attention."
_ALWAYS_UNDECAYED = (
    _SA + "Ds",
    _SA + "conv2d.bias",
    _SA + "out_norm.weight",
    _PRE + "smm_blocks.0.ln_1.weight",
    _PRE + "finalconv11.bias",
    "net_s.layers_up.1.upsample.norm.weight",
    "mff_oce.bn1.weight",
    "mff_oce.conv21.bias",
    "mff_oce.bn_layer.0.bn3.weight",
)
_ALWAYS_DECAYED = (
    _SA + "x_proj_weight",
    _SA + "dt_projs_weight",
    _SA + "in_proj.weight",
    _PRE + "conv55.0.weight",
)


def test_parameter_groups_flagged(tiny_model: MambaAD) -> None:
    dec, nod = _group_names(tiny_model, "flagged")
    for n in (*_ALWAYS_UNDECAYED, _SA + "A_logs", _SA + "dt_projs_bias"):
        assert n in nod, n
    for n in _ALWAYS_DECAYED:
        assert n in dec, n


def test_parameter_groups_as_the_authors_ran(tiny_model: MambaAD) -> None:
    """ADer's add_weight_decay: only 1-D tensors and ``*.bias`` undecayed (A_logs [K*d, N] and
    dt_projs_bias [K, d] are 2-D, so they are decayed); the paper configs use it."""
    assert MambaADDefaults().optim.no_decay == "ader"
    dec, nod = _group_names(tiny_model, "ader")
    default = tiny_model.parameter_groups(1e-4)
    assert [len(g["params"]) for g in default] == [len(dec), len(nod)]
    for n in _ALWAYS_UNDECAYED:
        assert n in nod, n
    for n in (*_ALWAYS_DECAYED, _SA + "A_logs", _SA + "dt_projs_bias"):
        assert n in dec, n
    params = dict(tiny_model.named_parameters())
    assert nod == {n for n in dec | nod if params[n].ndim == 1 or n.endswith(".bias")}
    with pytest.raises(ValueError, match=r"optim\.no_decay='adam'.*ader, flagged"):
        tiny_model.parameter_groups(1e-4, no_decay="adam")


# Official names and shapes (spec section 7) for the paper model, stage 1 (dim 256, 16x16).
def _expected_ss2d(dim: int, size: int, k: int = 8, n: int = 16) -> dict[str, tuple[int, ...]]:
    d, r = 2 * dim, math.ceil(dim / 16)
    return {
        "in_proj.weight": (2 * d, dim),
        "conv2d.weight": (d, 1, 3, 3),
        "conv2d.bias": (d,),
        "x_proj_weight": (k, r + 2 * n, d),
        "dt_projs_weight": (k, d, r),
        "dt_projs_bias": (k, d),
        "A_logs": (k * d, n),
        "Ds": (k * d,),
        "out_norm.weight": (d,),
        "out_norm.bias": (d,),
        "out_proj.weight": (dim, d),
        "scans.index_flat": (1, 1, size * size),
        "scans.index_flat_inv": (1, 1, size * size),
    }


def _expected_lss_convs(dim: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name in ("conv1b3", "conv1a3", "conv1b5", "conv1a5"):
        out[f"{name}.0.weight"] = (dim, dim, 1, 1)
        out[f"{name}.0.bias"] = (dim,)
    for name, k in (("conv33", 3), ("conv55", 5), ("conv77", 7)):
        out[f"{name}.0.weight"] = (dim, 1, k, k)
    out["finalconv11.weight"] = (dim, 3 * dim, 1, 1)
    out["finalconv11.bias"] = (dim,)
    return out


def test_state_dict_layout_matches_official(paper_model: MambaAD) -> None:
    sd = paper_model.state_dict()
    ss2d_prefix = "net_s.layers_up.1.blocks.1.smm_blocks.1.self_attention."
    got = {k[len(ss2d_prefix) :]: tuple(v.shape) for k, v in sd.items() if k.startswith(ss2d_prefix)}
    assert got == _expected_ss2d(256, 16)
    lss_prefix = "net_s.layers_up.2.blocks.0."
    got = {
        k[len(lss_prefix) :]: tuple(v.shape)
        for k, v in sd.items()
        if k.startswith(lss_prefix) and ".smm_blocks." not in k
    }
    assert got == _expected_lss_convs(128)
    assert {k.split(".")[0] for k in sd} == {"net_t", "mff_oce", "net_s"}
    assert len(paper_model.net_s.layers_up[2].blocks[0].smm_blocks) == 3
    assert sd["net_s.layers_up.1.upsample.expand.weight"].shape == (1024, 512)
    assert sd["net_s.layers_up.1.upsample.norm.weight"].shape == (256,)
    assert "net_s.layers_up.0.upsample.expand.weight" not in sd
    assert sd["mff_oce.bn_layer.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["mff_oce.conv21.bias"].shape == (128,)
    assert "mff_oce.conv1.bias" not in sd
    assert sd["net_t.layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert not any(k.startswith(("net_t.layer4", "net_t.fc")) for k in sd)
    assert not any(k.endswith(".perms") for k in sd)
    assert sd[ss2d_prefix + "scans.index_flat"].dtype == torch.long


def test_state_dict_round_trip_and_mambaad_repo_names(tiny_model: MambaAD) -> None:
    torch.manual_seed(1)
    other = MambaAD(teacher="resnet18", **TINY, **QUIET)
    sd = tiny_model.state_dict()
    assert not torch.equal(
        other.state_dict()["net_s.layers_up.0.blocks.0.conv77.0.weight"],
        sd["net_s.layers_up.0.blocks.0.conv77.0.weight"],
    )
    other.load_state_dict(sd, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # The MambaAD repo names the 7x7 wrappers conv1b7/conv1a7 and has no conv33: a loader
    # must rename those keys (conv1b7 -> conv1b3, conv1a7 -> conv1a3) and fill conv33.
    rekeyed = {
        k.replace(".conv1b3.", ".conv1b7.").replace(".conv1a3.", ".conv1a7."): v
        for k, v in sd.items()
        if ".conv33." not in k
    }
    result = other.load_state_dict(rekeyed, strict=False)
    assert result.missing_keys and all(
        any(f".{c}." in k for c in ("conv1b3", "conv1a3", "conv33")) for k in result.missing_keys
    )
    assert result.unexpected_keys and all(
        ".conv1b7." in k or ".conv1a7." in k for k in result.unexpected_keys
    )


def _resnet18_weight_check(teacher: nn.Module, ref: dict[str, torch.Tensor]) -> None:
    for key in (
        "conv1.weight",
        "layer1.0.conv1.weight",
        "layer3.1.bn2.running_var",
        "layer2.0.downsample.0.weight",
    ):
        assert torch.equal(teacher.state_dict()[key], ref[key]), key


def test_teacher_loads_timm_checkpoint(tmp_path) -> None:
    torch.manual_seed(3)
    ref = timm.create_model("resnet18", pretrained=False).state_dict()
    assert "fc.weight" in ref and "layer4.0.conv1.weight" in ref
    path = tmp_path / "resnet18_timm.pth"
    torch.save(ref, path)
    logs: list[str] = []
    teacher = build_teacher("resnet18", checkpoint=path, log=logs.append)
    _resnet18_weight_check(teacher, ref)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.feature_info.channels() == [64, 128, 256]
    assert any(str(path) in line for line in logs)
    assert not any("RANDOM" in line for line in logs)


def test_teacher_loads_torchvision_checkpoint_wrapped(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    ref = torchvision.models.resnet18(weights=None).state_dict()
    ref = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"resnet18_tv_{wrapper}.pth"
        torch.save({wrapper: ref, "epoch": 3}, path)
        teacher = build_teacher("resnet18", checkpoint=str(path), **QUIET)
        _resnet18_weight_check(teacher, ref)


def test_teacher_checkpoint_architecture_mismatch_names_file(tmp_path) -> None:
    path = tmp_path / "resnet18_for_r34.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18_for_r34\.pth"):
        build_teacher("resnet34", checkpoint=path, **QUIET)
    path50 = tmp_path / "resnet50_for_r34.pth"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path50)
    with pytest.raises(ValueError, match=r"resnet50_for_r34\.pth"):
        build_teacher("resnet34", checkpoint=path50, **QUIET)


def test_teacher_random_warning_and_offline_error(monkeypatch) -> None:
    logs: list[str] = []
    build_teacher("resnet18", log=logs.append)
    assert any("RANDOM weights" in line and "checkpoint" in line for line in logs)

    real_create = timm.create_model

    def offline_create(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("network unreachable")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(RuntimeError, match=r"offline.*model\.teacher\.checkpoint="):
        build_teacher("resnet34", pretrained=True, **QUIET)


@pytest.mark.parametrize(
    "name, channels", [("resnet50", (256, 512, 1024)), ("wide_resnet50_2", (256, 512, 1024))]
)
def test_other_backbones_channels(name: str, channels: tuple[int, int, int]) -> None:
    teacher = build_teacher(name, **QUIET)
    assert tuple(teacher.feature_info.channels()) == channels
    hfpn = HalfFPN(channels)
    assert hfpn.out_channels == 2 * channels[2]
    feats = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)]
    assert hfpn.eval()(feats).shape == (1, 2 * channels[2], 2, 2)


def test_hfpn_init_and_layout() -> None:
    hfpn = HalfFPN((64, 128, 256))
    assert hfpn.out_channels == 512
    assert len(hfpn.bn_layer) == 3 and hfpn.bn_layer[0].downsample is not None
    assert hfpn.bn_layer[1].downsample is None
    bns = [m for m in hfpn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    w = hfpn.convf.weight  # kaiming-normal fan_out: std = sqrt(2 / 256)
    assert abs(w.std().item() - math.sqrt(2 / 256)) < 0.01


@pytest.mark.parametrize("method", ["sweep", "scan", "zorder", "zigzag", "hilbert"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_all_scan_methods_and_directions_run(method: str, k: int) -> None:
    torch.manual_seed(0)
    scan = {"method": method, "directions": k}
    dec = MambaDecoder(dims=(32, 16, 8, 4), depths=(2, 2, 2, 2), scan=scan, image_size=64).eval()
    with torch.no_grad():
        outs = dec(torch.randn(1, 32, 2, 2))
    assert [tuple(o.shape) for o in outs] == [(1, 4, 16, 16), (1, 8, 8, 8), (1, 16, 4, 4)]
    assert all(torch.isfinite(o).all() for o in outs)
    scans = dec.layers_up[2].blocks[0].smm_blocks[0].self_attention.scans
    assert scans.perms.shape == (k, 64)
    assert scans.matches_index()


def _naive_forward_core(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """Direction-by-direction, step-by-step reference of SS2D.forward_core."""
    b, d, h, w = x.shape
    perms = direction_permutations(m.scans.method, h, w, m.num_directions)
    flat = x.reshape(b, d, h * w)
    out = torch.zeros(b, d, h * w, dtype=x.dtype)
    n = m.d_state
    for k, perm in enumerate(perms):
        seq = flat[:, :, perm]
        proj = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], seq)
        dt = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], proj[:, : m.dt_rank])
        delta = F.softplus(dt + m.dt_projs_bias[k][None, :, None])
        bmat, cmat = proj[:, m.dt_rank : m.dt_rank + n], proj[:, m.dt_rank + n :]
        a = -torch.exp(m.A_logs[k * d : (k + 1) * d])
        state = torch.zeros(b, d, n, dtype=x.dtype)
        ys = []
        for t in range(h * w):
            state = torch.exp(delta[:, :, t, None] * a) * state
            state = state + delta[:, :, t, None] * bmat[:, None, :, t] * seq[:, :, t, None]
            ys.append((state * cmat[:, None, :, t]).sum(-1))
        y = torch.stack(ys, -1) + m.Ds[k * d : (k + 1) * d, None] * seq
        out[:, :, perm] += y
    return out


@pytest.mark.parametrize("method, k", [("hilbert", 8), ("zigzag", 4), ("scan", 2)])
def test_ss2d_core_matches_naive_reference(method: str, k: int) -> None:
    torch.manual_seed(0)
    m = SS2D(d_model=8, d_state=4, size=4, scan=ScanOptions(method=method, directions=k))
    with torch.no_grad():
        m.x_proj_weight.normal_(0, 0.5)
        m.A_logs.add_(torch.randn_like(m.A_logs) * 0.1)
        m.Ds.normal_()
    x = torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        got = m.forward_core(x)
        ref = _naive_forward_core(copy.deepcopy(m).double(), x.double())  # float64: the reference
    assert_close_rel(got, ref, ss2d_bounds(m, x.permute(0, 2, 3, 1))[0])


def test_ss2d_init_as_official() -> None:
    torch.manual_seed(0)
    m = SS2D(d_model=64, d_state=16, size=4, scan=ScanOptions(method="sweep", directions=8))
    assert torch.allclose(torch.exp(m.A_logs), torch.arange(1, 17.0).expand(8 * 128, 16))
    assert torch.all(m.Ds == 1)
    assert m.A_logs._no_weight_decay and m.Ds._no_weight_decay
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.log().std() > 0.5  # log-uniform over two decades, not constant
    assert m.dt_projs_weight.abs().max() <= 4**-0.5
    assert m.x_proj_weight.abs().max() <= 128**-0.5
    assert m.scans.index_flat.shape == (1, 1, 16)
    assert torch.equal(m.scans.index_flat.flatten(), torch.arange(16))


def test_scan_index_buffers_are_curve_and_inverse() -> None:
    m = SS2D(d_model=8, size=4, scan=ScanOptions(method="scan", directions=4))
    expected = torch.tensor([0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12])
    assert torch.equal(m.scans.index_flat.flatten(), expected)
    inv = m.scans.index_flat_inv.flatten()
    assert torch.equal(inv[expected], torch.arange(16))
    keys = set(m.state_dict())
    assert {"scans.index_flat", "scans.index_flat_inv"} <= keys and "scans.perms" not in keys
    with torch.no_grad():
        m.scans.index_flat.copy_(m.scans.index_flat.flip(-1))
    assert not m.scans.matches_index()


def test_decoder_init_as_official() -> None:
    torch.manual_seed(0)
    dec = MambaDecoder(dims=(64, 32, 16, 8), depths=(2, 2, 2, 2), image_size=64, scan={"directions": 2})
    lin = dec.layers_up[0].blocks[0].smm_blocks[0].self_attention.in_proj.weight
    # timm's trunc_normal_ truncates at absolute +-2, so with std .02 it is a plain normal.
    assert abs(lin.std().item() - 0.02) < 0.003 and abs(lin.mean().item()) < 0.002
    expand = dec.layers_up[1].upsample.expand.weight
    assert abs(expand.std().item() - 0.02) < 0.003
    lss = dec.layers_up[0].blocks[0]
    assert abs(lss.conv77[0].weight.std().item() - math.sqrt(2 / 49)) < 0.05
    assert torch.all(lss.conv1b3[0].bias == 0) and torch.all(lss.finalconv11.bias == 0)
    assert torch.all(lss.smm_blocks[0].self_attention.conv2d.bias == 0)
    assert isinstance(lss.conv33[1], nn.InstanceNorm2d) and isinstance(lss.conv33[2], nn.SiLU)
    assert isinstance(lss, LSSModule)


def test_conv33_unused_in_forward() -> None:
    torch.manual_seed(0)
    lss = LSSModule(8, depth=2, size=4, scan=ScanOptions(method="sweep", directions=2)).eval()
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        before = lss(x)
        lss.conv33[0].weight.normal_()
        after = lss(x)
        lss.conv77[0].weight.normal_()
        changed = lss(x)
    assert torch.equal(before, after)
    assert not torch.allclose(before, changed)


@pytest.mark.parametrize("depth", [0, 1, 5, 7])
def test_invalid_depths_raise(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        lss_layout(depth)
    with pytest.raises(ValueError):
        MambaDecoder(dims=(32, 16, 8, 4), depths=(2, depth, 2, 2), image_size=64, scan={"directions": 2})


def test_stage_layout() -> None:
    assert [lss_layout(d) for d in (2, 3, 4, 6, 9)] == [(1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]


def test_drop_path_indexing_as_official(paper_model: MambaAD) -> None:
    dpr = [0.2 * (15 - i) / 15 for i in range(16)]  # linspace(0, .2, 16) reversed
    # Stage slices start at 0, 3, 7, 13; LSS module j of a stage takes slice[j].
    expected = [[dpr[0]], [dpr[3], dpr[4]], [dpr[7], dpr[8]], [dpr[13]]]
    sched = drop_path_schedule((3, 4, 6, 3), 0.2)
    for got_stage, exp_stage in zip(sched, expected):
        assert got_stage == pytest.approx(exp_stage)
    for layer, exp_stage in zip(paper_model.net_s.layers_up, expected):
        assert len(layer.blocks) == len(exp_stage)
        for module, rate in zip(layer.blocks, exp_stage):
            for blk in module.smm_blocks:
                assert blk.drop_path.drop_prob == pytest.approx(rate)
    assert drop_path_schedule((2, 2, 2, 2), 0.2)[1] == pytest.approx([0.2 * 5 / 7])


def test_invalid_dims_and_scan_args() -> None:
    with pytest.raises(ValueError, match="halve"):
        MambaDecoder(dims=(32, 16, 16, 4), depths=(2, 2, 2, 2), image_size=64)
    with pytest.raises(ValueError, match=r"model\.scan\.method"):
        SS2D(d_model=8, size=4, scan=ScanOptions(method="spiral"))
    with pytest.raises(ValueError, match=r"model\.scan\.directions"):
        SS2D(d_model=8, size=4, scan=ScanOptions(directions=3))


def test_random_teacher_gets_calibrated_batchnorm_and_stays_frozen() -> None:
    torch.manual_seed(0)
    teacher = build_teacher("resnet18", log=lambda *_: None)
    assert teacher.is_random
    # residual branches are live (timm would zero-init their last BN gamma)
    assert all(float(blk.bn2.weight.abs().sum()) > 0 for blk in teacher.layer1)
    images = [torch.randn(4, 3, 64, 64) * 2 + 1 for _ in range(3)]
    before = [f.detach() for f in teacher(images[0])]
    assert calibrate_batchnorm(teacher, images, max_batches=2) == 2
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert float(teacher.bn1.running_mean.abs().sum()) > 0
    after = teacher(images[2])
    # first stage: BN now normalises real activations (pre-ReLU mean ~0, var ~1 per channel)
    stem = teacher.bn1(teacher.conv1(images[2]))
    assert stem.mean(dim=(0, 2, 3)).abs().max() < 0.3
    assert (stem.var(dim=(0, 2, 3)) - 1).abs().max() < 0.5
    assert any(not torch.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_calibration_is_a_no_op_for_loaded_teachers(tmp_path) -> None:
    ref = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = MambaAD(
        teacher={"name": "resnet18", "checkpoint": str(path)},
        depths=(2, 2, 2, 2),
        image_size=64,
        log=lambda *_: None,
    )
    assert not model.teacher_is_random
    mean_before = model.net_t.bn1.running_mean.clone()
    assert model.calibrate_teacher([torch.randn(2, 3, 64, 64)]) == 0
    assert torch.equal(model.net_t.bn1.running_mean, mean_before)


# LSS designs of the paper's Table 4 (model.lss.*) and hybrid scans of Table 3.
def _lss(**kwargs: object) -> LSSModule:
    torch.manual_seed(0)
    return LSSModule(8, depth=1, size=4, scan=ScanOptions(method="sweep", directions=2), **kwargs).eval()


@pytest.mark.parametrize("kernels", [(1, 3), (3, 5), (5, 7), (1, 3, 5), (3, 5, 7), (1, 3, 5, 7)])
@pytest.mark.parametrize("pointwise", [True, False])
def test_lss_variant_layout_and_forward(kernels: tuple[int, ...], pointwise: bool) -> None:
    lss = _lss(kernels=kernels, pointwise=pointwise)
    convs = {k.split(".")[0] for k in lss.state_dict() if not k.startswith("smm_blocks")}
    expected = {f"conv{k}{k}" for k in kernels} | {"finalconv11"}
    if pointwise:
        wrap = {7: 3} if kernels == (5, 7) else {}
        expected |= {f"conv1{p}{wrap.get(k, k)}" for k in kernels for p in "ba"}
        if kernels == (5, 7):
            expected.add("conv33")  # the official layout's unused conv
    assert convs == expected
    for k in kernels:
        assert getattr(lss, f"conv{k}{k}")[0].weight.shape == (8, 1, k, k)
    assert lss.finalconv11.weight.shape == (8, 8 * (1 + len(kernels)), 1, 1)
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        out = lss(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        before, dw, after = lss.branch_names(kernels[-1])
        assert (before is None) == (after is None) == (not pointwise)
        getattr(lss, dw)[0].weight.normal_()  # every branch takes part in the output
        assert not torch.allclose(lss(x), out)


def test_lss_residual_switch() -> None:
    x = torch.randn(1, 4, 4, 8)
    for residual in (True, False):
        lss = _lss(residual=residual)
        with torch.no_grad():
            lss.finalconv11.weight.zero_()
            lss.finalconv11.bias.zero_()
            out = lss(x)
        assert torch.equal(out, x if residual else torch.zeros_like(x))


def test_lss_blocks_per_module() -> None:
    assert lss_layout(6, blocks=1) == (6, 1)
    assert lss_layout(4, blocks=2) == (2, 2)
    with pytest.raises(ValueError, match=r"model\.lss\.blocks=3"):
        lss_layout(4, blocks=3)
    dec = MambaDecoder(
        dims=(32, 16, 8, 4), depths=(3, 4, 6, 3), image_size=64, scan={"directions": 2}, lss={"blocks": 1}
    )
    assert [len(layer.blocks) for layer in dec.layers_up] == [3, 4, 6, 3]
    assert all(len(m.smm_blocks) == 1 for layer in dec.layers_up for m in layer.blocks)
    # every LSS module takes its own drop-path rate: all 16 rates, reversed
    rates = [m.smm_blocks[0].drop_path.drop_prob for layer in dec.layers_up for m in layer.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 16).tolist()[::-1])


@pytest.mark.parametrize("kernels", [(), (4, 5), (3, 3), (0, 1)])
def test_lss_invalid_kernels(kernels: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"model\.lss\.kernels"):
        _lss(kernels=kernels)


def test_default_lss_config_gives_the_paper_model() -> None:
    from configs.defaults import MambaADDefaults

    lss = MambaADDefaults().model.lss
    assert (lss.blocks, list(lss.kernels), lss.pointwise, lss.residual) == (None, [5, 7], True, True)
    default = _lss()
    explicit = _lss(kernels=[7, 5], pointwise=True, residual=True)
    assert default.state_dict().keys() == explicit.state_dict().keys()
    for key, value in default.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[key]), key


def test_build_model_passes_lss_and_hybrid_scan_options() -> None:
    import logging
    from pathlib import Path

    from model.build import build_model

    overrides = [
        "model.depths=[2,2,2,2]",
        "model.teacher.name=resnet18",
        "data.image_size=64",
        "model.lss.blocks=1",
        "model.lss.kernels=[3,5,7]",
        "model.lss.pointwise=False",
        "model.lss.residual=False",
        "model.scan.method=zigzag+hilbert",
        "model.scan.directions=4",
    ]
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/mambaad_demo.py", overrides)
    model = build_model(cfg, logging.getLogger("test"))
    module = model.net_s.layers_up[1].blocks[1]
    assert module.kernels == (3, 5, 7) and not module.pointwise and not module.residual
    assert len(model.net_s.layers_up[1].blocks) == 2 and len(module.smm_blocks) == 1
    assert module.smm_blocks[0].self_attention.scans.method == "zigzag+hilbert"
    with torch.no_grad():
        ft, fs = model.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in fs] == [f.shape for f in ft]


def test_hybrid_scan_shares_directions() -> None:
    m = SS2D(d_model=8, size=4, scan=ScanOptions(method="zigzag+hilbert", directions=8))
    perms = m.scans.perms
    assert torch.equal(perms[:4], direction_permutations("zigzag", 4, 4, 4))
    assert torch.equal(perms[4:], direction_permutations("hilbert", 4, 4, 4))
    assert m.scans.matches_index()
    four = SS2D(d_model=8, size=4, scan=ScanOptions(method="scan+zorder+zigzag+hilbert", directions=8))
    assert torch.equal(four.scans.perms[6:], direction_permutations("hilbert", 4, 4, 2))
    with pytest.raises(ValueError, match="equal shares"):
        SS2D(d_model=8, size=4, scan=ScanOptions(method="scan+zorder+zigzag+hilbert", directions=4))
    with pytest.raises(ValueError, match=r"model\.scan\.method"):
        SS2D(d_model=8, size=4, scan=ScanOptions(method="hilbert+hilbert", directions=8))


def test_no_random_teacher_warning_when_the_model_checkpoint_brings_the_teacher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from model.build import build_model

    small = ["model.depths=[2,2,2,2]", "model.teacher.name=resnet18", "data.image_size=64"]
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/mambaad_demo.py", small)
    log = logging.getLogger("test_teacher_warning")
    with caplog.at_level(logging.INFO, logger="test_teacher_warning"):
        torch.save(build_model(cfg, log).state_dict(), tmp_path / "net.pth")
    assert "RANDOM weights" in caplog.text  # the demo's teacher is random: the warning is due
    caplog.clear()
    cfg.model.checkpoint = str(tmp_path / "net.pth")
    with caplog.at_level(logging.INFO, logger="test_teacher_warning"):
        model = build_model(cfg, log)
    assert "RANDOM" not in caplog.text and "weights from the model checkpoint" in caplog.text
    assert not model.net_t.is_random
