"""Triton backend against the reference: under Triton's CPU interpreter in a subprocess (so
``TRITON_INTERPRET`` does not leak into other tests), and on a real GPU when there is one.

Covers the plain scan (``selective_scan_fn(backend="triton")``), the fused cross-scan
(``cross_scan_triton`` against ``scan_encode`` -> ``ref`` -> ``scan_decode``, grouped or not),
softplus precision at very negative ``delta``, and SS2D with the fused path against ``ref``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.ops import selective_scan as ss
from model.ops.selective_scan import available_backends, selective_scan_fn
from tests.scan_helpers import (
    CROSS_NAMES,
    NAMES,
    as_reference,
    assert_close_rel,
    cross_inputs,
    cross_reference,
    run_backend,
    run_cross,
    run_ss2d,
    scan_bounds,
    ss2d_bounds,
)
from tests.test_selective_scan import _inputs

ROOT = Path(__file__).resolve().parents[1]

# (b, K, d, L, N, use_d, use_bias, softplus, chunk, dtype)
INTERPRETER_CASES = [
    (2, 2, 3, 1, 4, True, True, True, 64, "float32"),
    (2, 8, 2, 5, 16, True, True, True, 64, "float32"),
    (2, 4, 4, 33, 5, True, True, True, 8, "float32"),
    (2, 2, 2, 33, 16, False, False, False, 64, "float32"),
    (2, 3, 4, 5, 8, True, False, True, 2, "float32"),
    (2, 8, 4, 33, 4, True, True, True, 16, "float32"),
    (2, 2, 3, 5, 4, True, True, True, 4, "bfloat16"),
    (2, 2, 2, 5, 4, True, True, False, 64, "float16"),
]


def _check_case(case: tuple) -> str | None:
    """Compare output and all gradients with ``ref`` (float64 for float32 inputs) within
    :func:`scan_bounds`; None when they match."""
    from model.ops import selective_scan_triton as sst

    b, k, d, length, n, use_d, use_bias, softplus, chunk, dtype = case
    sst.CHUNK = chunk
    tensors = {
        key: v.to(getattr(torch, dtype)) for key, v in _inputs(b, k, d, length, n, seed=length).items()
    }
    kwargs = {"use_d": use_d, "use_bias": use_bias, "softplus": softplus}
    try:
        y_ref, g_ref = run_backend("ref", tensors, **kwargs)
        y, grads = run_backend("triton", tensors, **kwargs)
        assert y.dtype == torch.float32
        tol_y, tol_g = scan_bounds(tensors)
        assert_close_rel(y, y_ref, tol_y)
        # 16-bit gradients: both backends round their float32 gradients to the input's precision,
        # and two values a few float32 units apart may round one 16-bit unit (eps) apart
        tol_g += 0.0 if dtype == "float32" else torch.finfo(getattr(torch, dtype)).eps
        for name in NAMES:
            if g_ref[name] is None:
                assert grads[name] is None, name
                continue
            assert grads[name].dtype == tensors[name].dtype, name
            assert_close_rel(grads[name].float(), g_ref[name].float(), tol_g)
    except AssertionError as err:
        return f"{case}: {err}"
    return None


class _CountCalls:
    """Count the calls of ``owner.name`` (and the batch sizes) while in the ``with`` block."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name, self.batches = owner, name, []

    def __enter__(self) -> _CountCalls:
        original = getattr(self.owner, self.name)
        self.own = vars(self.owner).get(self.name)  # None when inherited (autograd's ``apply``)

        def counting(*args, **kwargs):
            self.batches.append(args[0].shape[0])
            return original(*args, **kwargs)

        setattr(self.owner, self.name, counting)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.own is None:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.own)


def _plain_suite() -> list[str]:
    """The plain scan: every case, the forced batch split and the listing."""
    from model.ops import selective_scan_triton as sst

    failures = [f for f in map(_check_case, INTERPRETER_CASES) if f]
    limit = sst._MAX_ELEMENTS
    sst._MAX_ELEMENTS = sst._elements_per_sample(6, 2, 3, 5, 4) + 1  # one sample per launch
    try:
        with _CountCalls(sst._ScanTriton, "apply") as calls:
            split = _check_case((3, 2, 3, 5, 4, True, True, True, 64, "float32"))
    finally:
        sst._MAX_ELEMENTS = limit
    if split or calls.batches != [1, 1, 1]:
        failures.append(f"split: {split}, launches over batches {calls.batches} (expected [1, 1, 1])")
    if "triton" not in available_backends():
        failures.append("triton not listed under the interpreter")
    return failures


# (b, K, d_x, L, N, grouped, use_d, use_bias, softplus, dtype); d = d_x / K when grouped
FUSED_CASES = [
    (2, 2, 3, 7, 4, False, True, True, True, "float32"),
    (1, 4, 6, 11, 5, False, True, True, True, "float32"),
    (2, 8, 5, 9, 16, False, True, True, True, "float32"),
    (2, 4, 12, 10, 4, True, True, True, True, "float32"),
    (1, 8, 8, 6, 4, True, False, False, False, "float32"),
    (2, 2, 10, 7, 4, True, True, True, True, "bfloat16"),
    (2, 4, 3, 8, 4, False, True, True, True, "bfloat16"),
]


def _tolerances(device: str, tensors: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative tolerances (output, gradients): on the CPU (interpreter, float64 reference)
    :func:`scan_bounds`; on a GPU, against the float32 ``chunked`` backend with the GPU's fast
    ``exp``, one decimal above the interpreter's former fixed values (not yet run on a GPU)."""
    return scan_bounds(tensors) if device == "cpu" else (1e-4, 1e-3)


def _check_cross(case: tuple, device: str = "cpu", repeat: bool = False) -> str | None:
    """Fused cross-scan against :func:`_cross_reference` on the same values (the reference in
    float64 on the CPU): output and gradients within :func:`_tolerances` (bf16 gradients 1e-2,
    above one bf16 unit, 2^-7, of their rounding)
    of their largest value; with ``repeat``, a second call must give bit-identical results."""
    from model.ops import selective_scan_triton as sst

    b, k, d_x, length, n, grouped, use_d, use_bias, softplus, dtype = case
    tensors, perms = cross_inputs(b, k, d_x, length, n, grouped, seed=length)
    tensors = {key: v.to(device=device, dtype=getattr(torch, dtype)) for key, v in tensors.items()}

    def fused(t):
        args = (t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], perms.to(device))
        return sst.cross_scan_triton(*args, delta_softplus=softplus, grouped=grouped)

    try:
        reference = {key: v.float() for key, v in tensors.items()}
        y_ref, g_ref = run_cross(
            lambda t: cross_reference(t, perms, softplus, grouped),
            as_reference(reference) if device == "cpu" else reference,
            use_d,
            use_bias,
        )
        y, grads = run_cross(fused, tensors, use_d, use_bias)
        rel_y, rel_g = _tolerances(device, tensors)
        assert y.dtype == torch.float32 and y.shape == (b, d_x, length), (y.dtype, y.shape)
        assert_close_rel(y, y_ref, rel_y)
        for name in CROSS_NAMES:
            if g_ref[name] is None:
                assert grads[name] is None, name
                continue
            assert grads[name].dtype == tensors[name].dtype, name
            assert_close_rel(grads[name].float(), g_ref[name], rel_g if dtype == "float32" else 1e-2)
        if repeat:
            y2, grads2 = run_cross(fused, tensors, use_d, use_bias)
            assert torch.equal(y, y2), "output differs between calls"
            for name in CROSS_NAMES:
                assert grads[name] is None or torch.equal(grads[name], grads2[name]), f"{name} not repeatable"
    except AssertionError as err:
        return f"{case}: {err}"
    return None


def _fused_suite() -> list[str]:
    """Every fused case (two of them twice for determinism) and the forced batch split."""
    from model.ops import selective_scan_triton as sst

    failures = [f for i, case in enumerate(FUSED_CASES) if (f := _check_cross(case, repeat=i in (0, 3)))]
    split = (3, 4, 6, 5, 4, False, True, True, True, "float32")
    limit = sst._MAX_ELEMENTS
    sst._MAX_ELEMENTS = sst._elements_per_sample(6, 4, 6, 5, 4) + 1  # one sample per launch
    try:
        with _CountCalls(sst._ScanTriton, "apply") as calls:
            problem = _check_cross(split)
    finally:
        sst._MAX_ELEMENTS = limit
    if problem or calls.batches != [1, 1, 1]:
        failures.append(f"split: {problem}, launches over batches {calls.batches} (expected [1, 1, 1])")
    return failures


def _softplus_inputs() -> dict[str, torch.Tensor]:
    """A scan whose ``delta + delta_bias`` spans -30 .. 25, one level per channel (K=2, d=8)."""
    levels = torch.tensor([-30.0, -26, -22, -19, -17, -15, -13, -11, -9, -7, -4, -1, 2, 10, 19.5, 25])
    t = _inputs(2, 2, 8, 6, 4, seed=3)
    t["delta"] = levels[None, :, None] - t["delta_bias"][None, :, None] + 0.3 * t["delta"]
    return t


def _check_softplus(device: str = "cpu") -> str | None:
    """Output and delta gradient of a scan at very negative ``delta + delta_bias`` (no D, so the
    output is all state) against ``ref``, relative per channel, within :func:`_tolerances`."""
    t = {key: v.to(device) for key, v in _softplus_inputs().items()}

    def run(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = as_reference(t) if backend == "ref" and device == "cpu" else t
        leaves = {key: v.clone().requires_grad_(True) for key, v in inputs.items()}
        args = (leaves[name] for name in ("u", "delta", "A", "B", "C"))
        y = selective_scan_fn(*args, None, leaves["delta_bias"], delta_softplus=True, backend=backend)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * weight.to(device, y.dtype)).sum().backward()
        return y.detach(), leaves["delta"].grad

    (y_ref, g_ref), (y, g) = run("ref"), run("triton")

    def worst(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).abs().amax((0, 2)) / b.abs().amax((0, 2))).max())

    errors = {"output": worst(y, y_ref), "delta": worst(g, g_ref)}
    if any(err > rel for err, rel in zip(errors.values(), _tolerances(device, t))):
        return f"softplus: per-channel relative errors {errors}"
    return None


def _check_ss2d(
    method: str, k: int, batch: int, h: int, w: int, device: str = "cpu", groups: int = 1
) -> str | None:
    """SS2D with ``scan_backend="triton"`` (the fused path) against the same module on the
    unfused reference: output and the gradients of every parameter and of the input, within
    :func:`_tolerances`."""
    from model.mambaad.scan_orders import ScanOptions
    from model.mambaad.ss2d import SS2D
    from model.ops import selective_scan_triton as sst

    torch.manual_seed(0)
    m = SS2D(d_model=4, d_state=4, size=4, scan=ScanOptions(method=method, directions=k, grouped=groups > 1))
    m = m.to(device)
    with torch.no_grad():
        m.x_proj_weight.normal_(0, 0.5)
        m.A_logs.add_(torch.randn_like(m.A_logs) * 0.1)
        m.Ds.normal_()
    x = torch.randn(batch, h, w, 4, device=device)
    weight = torch.randn(batch, h, w, 4, device=device)

    y_ref, g_ref = run_ss2d(m, x, weight, "ref" if device == "cpu" else "chunked")
    with _CountCalls(sst, "cross_scan_triton") as calls:
        y, grads = run_ss2d(m, x, weight, "triton")
    try:
        assert calls.batches == [batch], f"fused path called for batches {calls.batches}"
        rel_y, rel_g = ss2d_bounds(m, x) if device == "cpu" else (1e-4, 1e-3)
        assert_close_rel(y, y_ref, rel_y)
        for name, g in g_ref.items():
            assert_close_rel(grads[name], g, rel_g)
    except AssertionError as err:
        return f"SS2D {method} K={k} groups={groups} {h}x{w}: {err}"
    return None


def _model_suite() -> list[str]:
    """Softplus precision and SS2D with the fused path."""
    checks = [
        _check_softplus(),
        _check_ss2d("hilbert", 8, 1, 4, 4),
        _check_ss2d("zigzag", 4, 2, 3, 5),
        _check_ss2d("zigzag+hilbert", 4, 2, 3, 5, groups=4),  # grouped scanning, fused
    ]
    return [f for f in checks if f]


SUITES = {"plain": _plain_suite, "fused": _fused_suite, "model": _model_suite}


def _interpreter_main(suite: str = "plain") -> None:
    """Run one suite under the interpreter; print a JSON list of failures."""
    print(json.dumps(SUITES[suite]()))


@pytest.mark.parametrize("suite", list(SUITES))
def test_triton_matches_reference_in_interpreter(suite):
    code = f"from tests.test_selective_scan_triton import _interpreter_main; _interpreter_main({suite!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only listing")
def test_not_listed_without_cuda(monkeypatch):
    assert "triton" not in available_backends()
    t = _inputs(1, 2, 2, 3, 4)
    with pytest.raises(ValueError, match="triton"):
        selective_scan_fn(*(t[name] for name in NAMES), backend="triton")
    monkeypatch.setattr(ss, "_triton_available", lambda: True)
    assert available_backends()[0] in ("triton", "mamba_ssm")


@pytest.mark.cuda
@pytest.mark.parametrize(("d", "length"), [(1024, 64), (256, 1024), (128, 4096)])
def test_triton_on_cuda_realistic_shapes(d, length):
    dev = torch.device("cuda")
    tensors = {key: v.to(dev) for key, v in _inputs(1, 8, d, length, 16, seed=0).items()}
    weight = torch.randn(1, 8 * d, length, device=dev)

    def run(backend):
        leaves = {key: v.clone().requires_grad_(True) for key, v in tensors.items()}
        y = selective_scan_fn(*(leaves[name] for name in NAMES), delta_softplus=True, backend=backend)
        (y * weight).sum().backward()
        return y.detach(), {name: leaves[name].grad for name in NAMES}

    y_ref, g_ref = run("chunked")
    y, grads = run("triton")
    assert_close_rel(y, y_ref, 1e-4)
    for name in NAMES:
        assert_close_rel(grads[name], g_ref[name], 1e-3)
    if ss._mamba_ssm_kernel() is None:
        args = [tensors[name] for name in NAMES]
        torch.testing.assert_close(
            selective_scan_fn(*args, backend="auto"), selective_scan_fn(*args, backend="triton")
        )


def test_launches_are_guarded_by_the_tensors_device():
    """CUDA tensors launch under their own device (a model on cuda:1); CPU ones under nothing."""
    from model.ops import selective_scan_triton as sst

    guard = sst._on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(sst._on_device(torch.zeros(1)), contextlib.nullcontext)


def test_launch_settings_come_from_the_shape_the_table_or_a_forced_setting(monkeypatch):
    """Defaults depend on the scan's shape alone (one compile per image size, whatever the batch);
    a measured LAUNCH_TABLE entry replaces them for its kernel and shape; forced_launch (the GPU
    check's) overrides both, within the channel count, and refuses settings Triton cannot take."""
    pytest.importorskip("triton")
    from model.ops import selective_scan_triton as sst

    stage0, stage3 = (8, 1024, 16, 64), (8, 128, 16, 4096)  # (groups, d, N, L) of the paper decoder
    assert sst.launch_settings("fwd", *stage0) == (16, sst.DEFAULT_WARPS)
    assert sst.launch_settings("bwd", *stage3) == (4, sst.DEFAULT_WARPS)
    assert sst.launch_settings("fwd", 2, 3, 4, 5) == (4, sst.DEFAULT_WARPS)  # at most d, rounded up
    monkeypatch.setitem(sst.LAUNCH_TABLE, ("bwd", *stage3), (8, 2))
    assert sst.launch_settings("bwd", *stage3) == (8, 2)
    assert sst.launch_settings("fwd", *stage3) == (4, sst.DEFAULT_WARPS)  # the other kernel's entry
    with sst.forced_launch(num_warps=8):
        assert sst.launch_settings("bwd", *stage3) == (8, 8)
        with sst.forced_launch(block=64):
            assert sst.launch_settings("fwd", 2, 3, 4, 5) == (4, sst.DEFAULT_WARPS)
    assert sst.launch_settings("bwd", *stage3) == (8, 2)
    with sst.forced_launch(block=2):  # below 4 channels only where d is
        assert sst.launch_settings("fwd", *stage3)[0] == 4
        assert sst.launch_settings("fwd", 8, 2, 16, 4)[0] == 2
    for bad in ({"block": 6}, {"num_warps": 3}, {"block": 0}):
        with pytest.raises(ValueError), sst.forced_launch(**bad):
            pass


def test_kernels_compile_for_a_gpu_without_one():
    """Both kernels compile for sm_90 (Triton's bundled ptxas, no GPU needed), with no atomics
    and the three barriers of the backward pass."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from model.ops import selective_scan_triton as sst

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    values = {"PERM": True, "SOFTPLUS": True, "BLOCK": 4, "N_PAD": 16, "CH": 8}

    def arg_type(name: str) -> str:
        if name in values:
            return "constexpr"
        if name == "perm_ptr":
            return "*i32"
        return "*fp32" if name.endswith("_ptr") else "i32"

    compiled = {}
    for kernel in (sst._fwd_kernel, sst._bwd_kernel):
        names = kernel.arg_names
        signature = {n: arg_type(n) for n in names}
        constexprs = {(names.index(n),): v for n, v in values.items() if n in names}
        source = ASTSource(kernel, signature, constexprs=constexprs)
        compiled[kernel.__name__] = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    for binary in compiled.values():
        assert "atom." not in binary.asm["ptx"]
    ttgir = compiled["_bwd_kernel"].asm["ttgir"]
    assert sum("ttg.barrier" in line or "gpu.barrier" in line for line in ttgir.splitlines()) == 3


# (b, K, d_x, L, N, grouped, use_d, use_bias, softplus, dtype) at decoder-like sizes
CUDA_CROSS_CASES = [
    (2, 8, 96, 1024, 16, False, True, True, True, "float32"),
    (4, 8, 256, 256, 16, True, True, True, True, "float32"),
    (2, 4, 64, 4096, 16, False, True, True, True, "bfloat16"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CROSS_CASES)
def test_cross_scan_on_cuda_matches_unfused_and_repeats(case):
    assert _check_cross(case, device="cuda", repeat=True) is None


@pytest.mark.cuda
def test_softplus_precision_and_ss2d_on_cuda():
    problems = [
        _check_softplus("cuda"),
        _check_ss2d("hilbert", 8, 2, 16, 16, device="cuda"),
        _check_ss2d("zigzag", 4, 2, 12, 20, device="cuda"),
    ]
    assert [p for p in problems if p] == []


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_launches_on_the_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1."""
    with torch.cuda.device(0):
        tensors = {key: v.to("cuda:1") for key, v in _inputs(2, 4, 32, 300, 16, seed=0).items()}
        args = [tensors[name] for name in NAMES]
        torch.testing.assert_close(
            selective_scan_fn(*args, delta_softplus=True, backend="triton"),
            selective_scan_fn(*args, delta_softplus=True, backend="chunked"),
            rtol=1e-4,
            atol=1e-4,
        )
        problems = [
            _check_cross(CUDA_CROSS_CASES[0], device="cuda:1"),
            _check_ss2d("hilbert", 4, 2, 8, 8, device="cuda:1"),
        ]
    assert [p for p in problems if p] == []
