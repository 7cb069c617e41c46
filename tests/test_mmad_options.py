"""MMAD-style options (our design after MMAD's README): grouped scanning and the dilated Mamba fuser."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from configs.defaults import MambaADDefaults
from model.mambaad import ss2d
from model.mambaad.fuser import DilatedMambaFuser
from model.mambaad.network import MambaAD
from model.mambaad.scan_orders import ScanOptions, dilated_order, direction_permutations, group_order
from model.mambaad.ss2d import SS2D
from model.ops.scan_reference import inverse_permutations
from model.ops.selective_scan import available_backends, selective_scan_fn
from tests.scan_helpers import assert_close_rel, run_ss2d, ss2d_bounds
from util.config import ConfigError


def _small_model(grouped: bool, bottleneck: str, directions: int = 4, method: str = "hilbert") -> MambaAD:
    torch.manual_seed(0)
    return MambaAD(
        teacher={"name": "resnet18", "pretrained": False},
        depths=(2, 2, 2, 2),
        scan={"method": method, "directions": directions, "backend": "ref", "grouped": grouped},
        bottleneck={"type": bottleneck, "dilations": [1, 2]},
        image_size=64,
        log=lambda *a: None,
    )


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("bottleneck", ["hfpn", "dilated_mamba"])
def test_every_combination_has_the_decoder_shapes_and_gradients(grouped, bottleneck):
    model = _small_model(grouped, bottleneck)
    x = torch.randn(2, 3, 64, 64)
    feats_t, feats_s = model(x)
    assert [f.shape for f in feats_s] == [f.shape for f in feats_t]
    sum(f.square().mean() for f in feats_s).backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and "conv33" not in n
    ]
    assert not missing
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    maps, scores = model.eval().predict(x)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)


def test_grouped_scan_with_one_group_equals_the_plain_scan():
    torch.manual_seed(0)
    m = SS2D(
        d_model=8, d_state=4, size=6, scan=ScanOptions(method="zigzag+hilbert", directions=8, backend="ref")
    )
    x = torch.randn(2, 16, 6, 6)
    plain = m.forward_core(x)
    grouped = m._forward_core_grouped("ref", x.reshape(2, 16, 36), m.scans.permutations(6, 6, x.device))
    torch.testing.assert_close(grouped, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("k", "method"),
    [(k, m) for k in (2, 4, 8) for m in ("sweep", "zigzag", "hilbert")] + [(4, "zorder+hilbert")],
)
def test_grouped_scan_scans_group_k_in_direction_k_only(k, method):
    torch.manual_seed(1)
    scan = ScanOptions(method=method, directions=k, backend="ref", grouped=True)
    m = SS2D(d_model=8, d_state=4, size=5, scan=scan)
    with torch.no_grad():
        m.x_proj_weight.normal_(0, 0.5)
    b, d, h, w = 2, 16, 5, 5
    x = torch.randn(b, d, h, w)
    got = m.forward_core(x)
    tol = ss2d_bounds(m, x.permute(0, 2, 3, 1))[0]
    m, x = copy.deepcopy(m).double(), x.double()  # the definition in float64: the reference
    perms = m.scans.permutations(h, w, x.device)
    dk, n, r = d // k, m.d_state, m.dt_rank
    outs = []
    for j in range(k):  # one direction, its own channels and parameters, by the plain definition
        xs = x.reshape(b, d, h * w)[:, j * dk : (j + 1) * dk][:, :, perms[j]]
        proj = torch.einsum("bdl,cd->bcl", xs, m.x_proj_weight[j])
        dts, bs, cs = proj.split([r, n, n], dim=1)
        y = selective_scan_fn(
            xs,
            torch.einsum("brl,dr->bdl", dts, m.dt_projs_weight[j]),
            -torch.exp(m.A_logs[j * dk : (j + 1) * dk]),
            bs[:, None],
            cs[:, None],
            D=m.Ds[j * dk : (j + 1) * dk],
            delta_bias=m.dt_projs_bias[j],
            delta_softplus=True,
            backend="ref",
        )
        outs.append(y[:, :, inverse_permutations(perms)[j]])
    assert_close_rel(got, torch.cat(outs, 1), tol)


def test_grouped_scan_costs_k_times_less_scan_work():
    full = SS2D(d_model=16, scan=ScanOptions(directions=8, backend="ref"))
    grouped = SS2D(d_model=16, scan=ScanOptions(directions=8, backend="ref", grouped=True))
    seen = []

    def spy(u, *args, **kwargs):
        seen.append(u.shape[1] * u.shape[2])
        return selective_scan_fn(u, *args, **kwargs)

    original = ss2d.selective_scan_fn
    ss2d.selective_scan_fn = spy
    try:
        x = torch.randn(1, 8, 8, 16)
        full(x)
        grouped(x)
    finally:
        ss2d.selective_scan_fn = original
    assert seen[0] == 8 * seen[1]  # channels x length scanned
    assert grouped.x_proj_weight.shape[-1] == full.x_proj_weight.shape[-1] // 8


@pytest.mark.parametrize("backend", [b for b in ("chunked", "cpu", "export") if b in available_backends()])
def test_grouped_scan_on_every_cpu_backend(backend):
    torch.manual_seed(2)
    m = SS2D(
        d_model=8,
        d_state=4,
        size=4,
        scan=ScanOptions(method="hilbert", directions=4, backend="ref", grouped=True),
    )
    x = torch.randn(2, 4, 4, 8)
    weight = torch.randn(2, 4, 4, 8)
    want, g_want = run_ss2d(m, x, weight, "ref")
    got, g_got = run_ss2d(m, x, weight, backend)
    tol_y, tol_g = ss2d_bounds(m, x)
    assert_close_rel(got, want, tol_y)
    for name, grad in g_want.items():
        assert_close_rel(g_got[name], grad, tol_g)


def test_group_order_keeps_directions_of_a_group_together():
    assert group_order(8, 1) == list(range(8)) == group_order(8, 8)
    assert group_order(8, 2) == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(ValueError, match="3 channel groups do not divide 8"):
        group_order(8, 3)


@pytest.mark.parametrize("method", ["sweep", "scan", "zigzag", "zorder", "hilbert"])
@pytest.mark.parametrize(("h", "w", "rate"), [(8, 8, 2), (16, 16, 4), (7, 5, 3), (6, 6, 1)])
def test_dilated_orders_are_permutations(method, h, w, rate):
    order = dilated_order(method, h, w, rate)
    assert sorted(order.tolist()) == list(range(h * w))
    for k in (2, 4, 8):
        perms = direction_permutations(method, h, w, k, dilation=rate)
        assert all(sorted(row.tolist()) == list(range(h * w)) for row in perms)
    if rate == 1:
        assert np.array_equal(order, direction_permutations(method, h, w, 2)[0].numpy())


def test_dilated_sweep_neighbours_are_rate_pixels_apart():
    order = dilated_order("sweep", 8, 8, 2)
    rows, cols = np.divmod(order, 8)
    first = order[:16]  # sub-grid (0, 0): rows and columns 0, 2, 4, 6
    assert set((rows[:16] % 2).tolist()) == {0} and set((cols[:16] % 2).tolist()) == {0}
    steps = np.abs(np.diff(cols[:4]))
    assert steps.tolist() == [2, 2, 2] and len(set(first.tolist())) == 16


def test_dilated_fuser_output_and_size():
    fuser = DilatedMambaFuser((64, 128, 256), dilations=(2, 4), image_size=256)
    feats = [torch.randn(1, 64, 64, 64), torch.randn(1, 128, 32, 32), torch.randn(1, 256, 16, 16)]
    assert fuser(feats).shape == (1, 512, 8, 8)
    paper = MambaAD(teacher={"name": "resnet34", "pretrained": False}, image_size=256, log=lambda *a: None)
    dilated = MambaAD(
        teacher={"name": "resnet34", "pretrained": False},
        image_size=256,
        bottleneck={"type": "dilated_mamba", "dilations": [2, 4]},
        log=lambda *a: None,
    )
    n_paper, n_dilated = (sum(p.numel() for p in m.parameters()) for m in (paper, dilated))
    assert n_paper < n_dilated <= 1.10 * n_paper


def test_bad_values_name_their_key():
    with pytest.raises(ValueError, match=r"model\.bottleneck\.dilations"):
        DilatedMambaFuser((64, 128, 256), dilations=(2, 4), image_size=64)  # the map is 4x4
    with pytest.raises(ValueError, match=r"model\.scan\.grouped: 6 channels cannot be split into 4"):
        SS2D(d_model=3, scan=ScanOptions(directions=4, grouped=True))
    with pytest.raises(ValueError, match="dilation rate 8"):
        direction_permutations("sweep", 8, 8, 2, dilation=8)
    cfg = MambaADDefaults()
    cfg.data.image_size = 64
    cfg.model.bottleneck.dilations = [2, 4]
    with pytest.raises(ConfigError, match=r"model\.bottleneck\.dilations=\[2, 4\]"):
        cfg.validate()
    cfg = MambaADDefaults()
    cfg.model.scan.grouped = "yes"
    with pytest.raises(ConfigError, match=r"model\.scan\.grouped"):
        cfg.validate()
