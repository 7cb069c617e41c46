"""Selective scan: the hand-worked definition, and the chunked backend against the reference."""

import math

import pytest
import torch

from model.ops.selective_scan import available_backends, selective_scan_fn
from tests.scan_helpers import NAMES, assert_close_rel, run_backend


def _inputs(b, k, d, length, n, seed=0, delta=None, a_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    channels = k * d
    tensors = {
        "u": torch.randn(b, channels, length, generator=g),
        "delta": torch.randn(b, channels, length, generator=g) * 0.5 if delta is None else delta,
        "A": -torch.rand(channels, n, generator=g) * a_scale - 0.1,
        "B": torch.randn(b, k, n, length, generator=g),
        "C": torch.randn(b, k, n, length, generator=g),
        "D": torch.randn(channels, generator=g),
        "delta_bias": torch.randn(channels, generator=g) * 0.3,
    }
    if delta is not None:
        tensors["delta"] = delta.expand(b, channels, length).clone()
    return tensors


def test_hand_computed_case():
    # One channel, N=1, L=3, no softplus. u=(1,2,3), delta=(1,1,2), A=-ln 2, B=(1,2,1),
    # C=(1,1,2), D=0.5.  Decays exp(delta*A) = (0.5, 0.5, 0.25); inputs delta*B*u = (1, 4, 6).
    # h = (1, 0.5*1 + 4, 0.25*4.5 + 6) = (1, 4.5, 7.125);
    # y = C*h + D*u = (1 + 0.5, 4.5 + 1, 14.25 + 1.5) = (1.5, 5.5, 15.75).
    u = torch.tensor([[[1.0, 2.0, 3.0]]])
    delta = torch.tensor([[[1.0, 1.0, 2.0]]])
    A = torch.tensor([[-math.log(2.0)]])
    B = torch.tensor([[[[1.0, 2.0, 1.0]]]])
    C = torch.tensor([[[[1.0, 1.0, 2.0]]]])
    D = torch.tensor([0.5])
    expected = torch.tensor([[[1.5, 5.5, 15.75]]])
    for backend in ("ref", "chunked"):
        y = selective_scan_fn(u, delta, A, B, C, D, backend=backend)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


CASES = [
    # (b, K, d, L, N, use_d, use_bias, softplus)
    (2, 8, 2, 1, 4, True, True, True),
    (1, 8, 3, 37, 4, True, True, True),
    (2, 4, 2, 64, 3, False, False, False),
    (2, 8, 2, 100, 4, True, False, True),
    (1, 2, 3, 130, 5, False, True, True),
    (1, 1, 2, 129, 2, True, True, False),
]


@pytest.mark.parametrize(("b", "k", "d", "length", "n", "use_d", "use_bias", "softplus"), CASES)
def test_chunked_matches_reference(b, k, d, length, n, use_d, use_bias, softplus):
    tensors = _inputs(b, k, d, length, n, seed=length)
    if not softplus:
        tensors["delta"] = tensors["delta"].abs()
    y_ref, g_ref = run_backend("ref", tensors, use_d, use_bias, softplus)
    y_chk, g_chk = run_backend("chunked", tensors, use_d, use_bias, softplus)
    assert y_chk.dtype == torch.float32 and y_chk.shape == (b, k * d, length)
    assert_close_rel(y_chk, y_ref, 1e-5)
    for name in NAMES:
        if not (use_d or name != "D") or not (use_bias or name != "delta_bias"):
            assert g_ref[name] is None and g_chk[name] is None
            continue
        # With L=1 the decay never reaches the output: autograd may leave A's grad unset (zero).
        got = torch.zeros_like(g_ref[name]) if g_chk[name] is None else g_chk[name]
        assert_close_rel(got, g_ref[name], 1e-4)


def test_large_decay_and_zero_delta():
    b, k, d, length, n = 1, 2, 2, 80, 4
    delta = torch.zeros(1, 1, length)
    delta[..., ::3] = 50.0
    tensors = _inputs(b, k, d, length, n, delta=delta, a_scale=16.0)
    tensors["A"][:, 0] = -16.0
    y_ref, g_ref = run_backend("ref", tensors, True, False, False)
    y_chk, g_chk = run_backend("chunked", tensors, True, False, False)
    assert torch.isfinite(y_chk).all()
    assert_close_rel(y_chk, y_ref, 1e-5)
    for name in ("u", "delta", "A", "B", "C", "D"):
        assert torch.isfinite(g_chk[name]).all()
        assert_close_rel(g_chk[name], g_ref[name], 1e-4)


def test_all_zero_delta_gives_skip_only():
    tensors = _inputs(1, 2, 2, 10, 3, delta=torch.zeros(1, 1, 10))
    t = tensors
    y = selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], backend="chunked")
    torch.testing.assert_close(y, t["D"][:, None] * t["u"])


def test_bf16_inputs_give_fp32_output():
    t = {k: v.to(torch.bfloat16) for k, v in _inputs(1, 2, 2, 20, 3).items()}
    args = [t[name] for name in NAMES]
    outs = [selective_scan_fn(*args, delta_softplus=True, backend=be) for be in ("ref", "chunked")]
    for y in outs:
        assert y.dtype == torch.float32
    assert_close_rel(outs[1], outs[0], 1e-5)


def test_backends_listing_and_errors():
    names = available_backends()
    assert "ref" in names and "chunked" in names
    t = _inputs(1, 2, 2, 5, 3)
    args = [t[name] for name in NAMES]
    torch.testing.assert_close(
        selective_scan_fn(*args, backend="auto"), selective_scan_fn(*args, backend="chunked")
    )
    with pytest.raises(ValueError, match="chunked"):
        selective_scan_fn(*args, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            selective_scan_fn(*args, backend="mamba_ssm")
