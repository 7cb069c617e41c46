"""Selective scan: the hand-worked definition, and the chunked backend against the reference."""

import math
import sys
import warnings

import pytest
import torch

from model.ops.selective_scan import available_backends, selective_scan_fn
from tests.scan_helpers import NAMES, assert_close_rel, run_backend, scan_bounds


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
    tol_y, tol_g = scan_bounds(tensors)
    assert_close_rel(y_chk, y_ref, tol_y)
    for name in NAMES:
        if not (use_d or name != "D") or not (use_bias or name != "delta_bias"):
            assert g_ref[name] is None and g_chk[name] is None
            continue
        # With L=1 the decay never reaches the output: autograd may leave A's grad unset (zero).
        got = torch.zeros_like(g_ref[name]) if g_chk[name] is None else g_chk[name]
        assert_close_rel(got, g_ref[name], tol_g)


def test_large_decay_and_zero_delta():
    b, k, d, length, n = 1, 2, 2, 80, 4
    delta = torch.zeros(1, 1, length)
    delta[..., ::3] = 50.0
    tensors = _inputs(b, k, d, length, n, delta=delta, a_scale=16.0)
    tensors["A"][:, 0] = -16.0
    y_ref, g_ref = run_backend("ref", tensors, True, False, False)
    y_chk, g_chk = run_backend("chunked", tensors, True, False, False)
    assert torch.isfinite(y_chk).all()
    tol_y, tol_g = scan_bounds(tensors)
    assert_close_rel(y_chk, y_ref, tol_y)
    for name in ("u", "delta", "A", "B", "C", "D"):
        assert torch.isfinite(g_chk[name]).all()
        assert_close_rel(g_chk[name], g_ref[name], tol_g)


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
    assert_close_rel(outs[1], outs[0], 2 * scan_bounds(t)[0])  # two float32 computations


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


def test_mamba_ssm_probe_survives_a_broken_extension(tmp_path, monkeypatch):
    """A wheel whose CUDA extension fails to load (OSError, not ImportError) means 'absent', once."""
    from model.ops import selective_scan as ss

    pkg = tmp_path / "mamba_ssm" / "ops"
    pkg.mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "selective_scan_interface.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(tmp_path / 'imports.txt')!r}).open('a').write('x')\n"
        "raise OSError('libcudart.so.12: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("mamba_ssm")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ss, "_MAMBA_SSM_IMPORT_ERROR", [])
    ss._mamba_ssm_kernel.cache_clear()
    try:
        assert ss._mamba_ssm_kernel() is None
        assert ss._mamba_ssm_kernel() is None
        assert (tmp_path / "imports.txt").read_text() == "x"  # imported once, then cached
        assert "libcudart" in ss._MAMBA_SSM_IMPORT_ERROR[0]
        assert "mamba_ssm" not in available_backends()
        t = _inputs(1, 2, 2, 3, 4)
        with pytest.raises(ValueError, match="libcudart"):
            selective_scan_fn(*(t[name] for name in NAMES), backend="mamba_ssm")
    finally:
        ss._mamba_ssm_kernel.cache_clear()


def test_auto_on_cuda_checks_backends_and_respects_determinism(monkeypatch):
    """``auto`` takes mamba_ssm only when it imports, passes its check and determinism is off."""
    from model.ops import selective_scan as ss

    verdicts = {"mamba_ssm": True, "triton": True}
    asked = []

    def works(name, device):
        asked.append(name)
        return verdicts[name]

    monkeypatch.setattr(ss, "_mamba_ssm_kernel", lambda: object())
    monkeypatch.setattr(ss, "_triton_available", lambda: True)
    monkeypatch.setattr(ss, "backend_works", works)
    # other tests of the session may have switched deterministic mode on process-wide
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    cuda = torch.device("cuda")
    assert ss.resolve_backend("auto", cuda) == "mamba_ssm"
    assert ss.resolve_backend("ref", cuda) == "ref"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    asked.clear()
    assert ss.resolve_backend("auto", cuda) == "triton"
    assert asked == ["triton"]  # mamba_ssm's atomic backward is never even tried
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    verdicts["mamba_ssm"] = False
    assert ss.resolve_backend("auto", cuda) == "triton"
    verdicts["triton"] = False
    assert ss.resolve_backend("auto", cuda) == "chunked"


def test_first_use_check_rejects_a_wrong_backend_and_warns_once(monkeypatch):
    from model.ops import selective_scan as ss

    monkeypatch.setattr(ss, "_checked", {})
    assert ss.backend_works("chunked", torch.device("cpu"))
    wrong = ss.selective_scan_chunked
    monkeypatch.setattr(ss, "selective_scan_chunked", lambda *a, **k: wrong(*a, **k) * 1.01)
    monkeypatch.setattr(ss, "_checked", {})
    with pytest.warns(RuntimeWarning, match="'chunked' failed its first-use check.*output differs"):
        assert not ss.backend_works("chunked", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ss.backend_works("chunked", torch.device("cpu"))  # cached: no second warning

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert "illegal memory access" in ss.smoke_test(crash, torch.device("cpu"))
