"""Selective scan, backend ``cpu`` (Numba kernels): outputs and all gradients against ``ref``."""

import itertools
import math

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from model.ops import cpu_kernels, cpu_math
from model.ops import selective_scan as ss
from model.ops import selective_scan_cpu as ss_cpu
from model.ops.selective_scan import available_backends, selective_scan_fn
from tests.rounding import gamma32
from tests.scan_helpers import (
    CROSS_NAMES,
    NAMES,
    as_reference,
    assert_close_rel,
    cross_inputs,
    cross_reference,
    cross_scan_cpu,
    run_backend,
    run_cross,
    run_ss2d,
    scan_bounds,
    ss2d_bounds,
)

K, D_INNER, N = 8, 4, 16


def _inputs(b, length, seed=0, k=K, d=D_INNER, n=N):
    g = torch.Generator().manual_seed(seed)
    channels = k * d
    return {
        "u": torch.randn(b, channels, length, generator=g),
        "delta": torch.randn(b, channels, length, generator=g) * 0.5,
        "A": -torch.rand(channels, n, generator=g) - 0.1,
        "B": torch.randn(b, k, n, length, generator=g),
        "C": torch.randn(b, k, n, length, generator=g),
        "D": torch.randn(channels, generator=g),
        "delta_bias": torch.randn(channels, generator=g) * 0.3,
    }


def _compare(tensors, use_d=True, use_bias=True, softplus=True, grad_names=NAMES):
    y_ref, g_ref = run_backend("ref", tensors, use_d, use_bias, softplus, grad_names)
    y_cpu, g_cpu = run_backend("cpu", tensors, use_d, use_bias, softplus, grad_names)
    assert y_cpu.dtype == torch.float32 and y_cpu.shape == y_ref.shape
    assert torch.isfinite(y_cpu).all()
    tol_y, tol_g = scan_bounds(tensors)
    assert_close_rel(y_cpu, y_ref, tol_y)
    for name in NAMES:
        used = (use_d or name != "D") and (use_bias or name != "delta_bias")
        if not used or name not in grad_names:
            assert g_cpu[name] is None and g_ref[name] is None, name
            continue
        assert g_cpu[name] is not None and torch.isfinite(g_cpu[name]).all(), name
        # With L=1 the decay never reaches the output: autograd may leave A's grad unset.
        expected = torch.zeros_like(g_cpu[name]) if g_ref[name] is None else g_ref[name]
        assert_close_rel(g_cpu[name], expected, tol_g)


@pytest.mark.parametrize(
    ("b", "length", "use_d", "use_bias", "softplus"),
    list(itertools.product((1, 3), (1, 7, 64, 130), (True, False), (True, False), (True, False))),
)
def test_matches_reference(b, length, use_d, use_bias, softplus):
    tensors = _inputs(b, length, seed=length + b)
    if not softplus:
        tensors["delta"] = tensors["delta"].abs()
    _compare(tensors, use_d, use_bias, softplus)


def test_large_decay_and_zero_delta():
    length = 80
    tensors = _inputs(2, length, seed=3)
    delta = torch.zeros(length)
    delta[::3] = 50.0
    tensors["delta"] = delta.expand_as(tensors["delta"]).clone()
    tensors["A"] = tensors["A"] * 16.0
    tensors["A"][:, 0] = -16.0
    _compare(tensors, use_bias=False, softplus=False)


def test_partial_channel_block_chunk_and_state_remainders():
    # 70 channels per group: one full block of lanes and one of 6; L=37: a partial last chunk
    # of steps; N=5: one pass of 4 states and one single state.
    assert 70 % cpu_kernels.LANES and 37 % cpu_kernels.CHUNK
    assert 70 % cpu_kernels.BWD_LANES and 37 % cpu_kernels.BWD_CHUNK
    _compare(_inputs(2, 37, seed=11, k=2, d=70, n=5))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize(
    ("use_d", "use_bias", "softplus"),
    [(True, True, True), (False, False, False), (True, False, True), (False, True, False)],
)
def test_backward_odd_channels_and_partial_chunks(k, use_d, use_bias, softplus):
    # 67 channels per group: a full block of lanes, then one of 3 (padded lanes must add
    # nothing to the B/C grads summed over the block); L=150: two chunks and a partial one.
    d, length = 67, 150
    assert d % cpu_kernels.BWD_LANES and length % cpu_kernels.BWD_CHUNK and length > 2 * cpu_kernels.BWD_CHUNK
    tensors = _inputs(2, length, seed=20 + k, k=k, d=d)
    if not softplus:  # delta + delta_bias >= 0, or the states grow as exp(|delta A| t)
        tensors["delta"] = tensors["delta"].abs()
        tensors["delta_bias"] = tensors["delta_bias"].abs()
    _compare(tensors, use_d, use_bias, softplus)


@pytest.mark.parametrize("d", [1, 5, 64, 129])
def test_backward_group_widths(d):
    # fewer lanes than a block, exactly one block, one block and a single channel
    _compare(_inputs(3, 70, seed=d, k=2, d=d, n=16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_grads_match_reference(dtype):
    t = {k: v.to(dtype) for k, v in _inputs(2, 90, seed=4, k=2, d=67).items()}
    _, g_ref = run_backend("ref", t)
    _, g_cpu = run_backend("cpu", t)
    for name in NAMES:
        assert g_cpu[name].dtype == dtype, name
        # both compute in fp32 and round the gradients to the input's 8 (bf16) or 11 (fp16)
        # significant bits: each rounding moves a value by at most 2^-8 of itself, two by 2^-7
        assert_close_rel(g_cpu[name].float(), g_ref[name].float(), 2.0**-7)


def _grads(tensors, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_backend("cpu", tensors)[1]
    finally:
        torch.set_num_threads(before)


def test_backward_is_bit_identical_across_calls_and_thread_counts():
    # b*K = 6 tasks of two blocks each, spread over 1 or 2 threads
    t = _inputs(3, 150, seed=8, k=2, d=67)
    first = _grads(t, 2)
    for grads in (_grads(t, 2), _grads(t, 1)):
        for name in NAMES:
            assert torch.equal(grads[name], first[name]), name


def test_backward_scratch_does_not_grow_with_batch_channels_or_length():
    # what one backward thread allocates (the kernel sizes its scratch with this function): the
    # buffers of one chunk, whatever the sequence; the checkpoints come from the forward pass
    n = 16
    assert ss_cpu.backward_scratch_bytes(8192, n) == ss_cpu.backward_scratch_bytes(1, n) < 1 << 20
    # those checkpoints: one state of n floats per channel (rounded up to blocks of 64) and per
    # 64 steps; the decoder's stage 3 at 256x256 against the input u alone
    b, groups, per_group, length = 4, 8, 128, 4096
    shape = cpu_kernels.checkpoint_shape(b, groups, per_group, length, n)
    assert shape == (b, groups * 2, length // cpu_kernels.BWD_CHUNK, n, cpu_kernels.BWD_LANES)
    assert math.prod(shape) == b * groups * per_group * length * n // cpu_kernels.BWD_CHUNK
    assert math.prod(shape) == b * groups * per_group * length // 4
    assert cpu_kernels.checkpoint_shape(1, 2, 3, 65, n) == (1, 2, 2, n, cpu_kernels.BWD_LANES)


def test_no_checkpoints_are_kept_without_gradients():
    t = _inputs(1, 70, seed=3, k=2, d=5)
    kept = []
    real = ss_cpu.forward_kernel

    def spy(*args):
        kept.append(args[-1].shape)
        return real(*args)

    ss_cpu.forward_kernel = spy
    try:
        with torch.no_grad():
            args = (t[name] for name in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
            selective_scan_fn(*args, delta_softplus=True, backend="cpu")
        run_backend("cpu", t)
    finally:
        ss_cpu.forward_kernel = real
    assert kept == [(0, 0, 0, 0, 0), cpu_kernels.checkpoint_shape(1, 2, 5, 70, t["A"].shape[1])]


def test_vector_math_helpers_match_float64():
    raw = np.concatenate([np.linspace(-100.0, 30.0, 1301), [-1e-8, 0.0, 1e-8, 19.999, 20.0, 20.001]])
    raw = raw.astype(np.float32)
    got = np.array([cpu_math.softplus32(x) for x in raw], dtype=np.float64)
    r64 = raw.astype(np.float64)
    want = np.where(r64 > 20.0, r64, np.log1p(np.exp(r64)))
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want) + 1e-37)
    assert np.isnan(cpu_math.softplus32(np.float32(np.nan)))

    z = np.linspace(-125.9, 127.9, 2573).astype(np.float32)
    got = np.array([cpu_math.exp2_32(x) for x in z], dtype=np.float64)
    want = np.exp2(z.astype(np.float64))
    assert np.all(np.abs(got - want) <= 1e-6 * want)
    assert cpu_math.exp2_32(np.float32(0.0)) == 1.0
    assert cpu_math.exp2_32(np.float32(128.0)) == np.inf and cpu_math.exp2_32(np.float32(1e4)) == np.inf
    # Anything below 2**-126 gives 2**-126, the smallest normal float (not a denormal or garbage).
    assert cpu_math.exp2_32(np.float32(-1e4)) == np.float32(2.0**-126)


def test_all_zero_delta_gives_skip_only():
    t = _inputs(2, 10)
    t["delta"] = torch.zeros_like(t["delta"])
    y = selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], backend="cpu")
    torch.testing.assert_close(y, t["D"][:, None] * t["u"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_fp32_output_and_grads_in_input_dtype(dtype):
    t = {k: v.to(dtype) for k, v in _inputs(2, 20).items()}
    outs = [
        selective_scan_fn(*(t[n] for n in NAMES), delta_softplus=True, backend=be) for be in ("ref", "cpu")
    ]
    assert outs[1].dtype == torch.float32
    assert_close_rel(outs[1], outs[0], 2 * scan_bounds(t)[0])  # two float32 computations
    _, grads = run_backend("cpu", t)
    for name in NAMES:
        assert grads[name].dtype == dtype and grads[name].shape == t[name].shape


def test_grads_only_where_required():
    _compare(_inputs(3, 33, seed=5), grad_names=("u", "B", "delta_bias"))
    t = _inputs(1, 9)
    with torch.no_grad():
        y = selective_scan_fn(*(t[n] for n in NAMES), backend="cpu")
    assert not y.requires_grad


def test_non_contiguous_inputs():
    t = _inputs(3, 21, seed=7)
    views = {
        "u": t["u"].transpose(1, 2).contiguous().transpose(1, 2),
        "delta": t["delta"].transpose(0, 2).contiguous().transpose(0, 2),
        "A": t["A"].t().contiguous().t(),
        "B": t["B"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
        "C": torch.stack([t["C"], t["C"]], dim=-1)[..., 0],
        "D": torch.stack([t["D"], t["D"]], dim=1)[:, 1],
        "delta_bias": t["delta_bias"],
    }
    assert not any(views[n].is_contiguous() for n in NAMES[:-1])
    leaves = {k: v.detach().requires_grad_(True) for k, v in views.items()}
    y = selective_scan_fn(*(leaves[n] for n in NAMES), delta_softplus=True, backend="cpu")
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * weight).sum().backward()
    y_ref, g_ref = run_backend("cpu", t)
    torch.testing.assert_close(y.detach(), y_ref, rtol=0, atol=0)
    for name in NAMES:
        torch.testing.assert_close(leaves[name].grad, g_ref[name], rtol=0, atol=0)


def test_auto_listing_and_errors(monkeypatch):
    assert "cpu" in available_backends()
    t = _inputs(1, 5)
    args = [t[n] for n in NAMES]
    torch.testing.assert_close(
        selective_scan_fn(*args, backend="auto"), selective_scan_fn(*args, backend="cpu"), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="expected"):
        selective_scan_fn(*args[:2], args[2][:, :3], *args[3:], backend="cpu")
    monkeypatch.setattr(ss, "_numba_available", lambda: False)
    monkeypatch.setattr(ss_cpu, "NUMBA_AVAILABLE", False)
    assert "cpu" not in available_backends()
    with pytest.raises(ValueError, match="pip install numba"):
        selective_scan_fn(*args, backend="cpu")
    with pytest.raises(ValueError, match="pip install numba"):
        ss_cpu.selective_scan_cpu(*args)
    torch.testing.assert_close(
        selective_scan_fn(*args, backend="auto"), selective_scan_fn(*args, backend="ref"), rtol=0, atol=0
    )


# (b, K, d_x, L, N, grouped, softplus, use_d, use_bias): 64-lane blocks full and partial,
# chunks of 16 (forward) and 64 (backward) steps full and partial, grouped or not
CROSS_CASES = [
    (2, 2, 3, 7, 4, False, False, True, True),
    (1, 4, 6, 11, 5, False, True, True, True),
    (2, 8, 5, 9, 16, False, True, False, False),
    (2, 4, 67, 150, 16, False, True, True, True),
    (2, 4, 12, 10, 4, True, True, True, True),
    (1, 8, 136, 200, 16, True, True, True, False),
    (3, 2, 130, 300, 8, False, True, False, True),
]


def _cross_cpu(perms, softplus=True, grouped=False):
    def run(t):
        args = (t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], perms)
        return cross_scan_cpu(*args, delta_softplus=softplus, grouped=grouped)

    return run


@pytest.mark.parametrize("case", CROSS_CASES)
def test_cross_scan_matches_the_unfused_reference(case):
    b, k, d_x, length, n, grouped, softplus, use_d, use_bias = case
    tensors, perms = cross_inputs(b, k, d_x, length, n, grouped, seed=length)
    reference = lambda t: cross_reference(t, perms, softplus, grouped)  # noqa: E731
    y_ref, g_ref = run_cross(reference, as_reference(tensors), use_d, use_bias)
    y, grads = run_cross(_cross_cpu(perms, softplus, grouped), tensors, use_d, use_bias)
    assert y.dtype == torch.float32 and y.shape == (b, d_x, length)
    tol_y, tol_g = scan_bounds(tensors)
    assert_close_rel(y, y_ref, tol_y)
    for name in CROSS_NAMES:
        if g_ref[name] is None:
            assert grads[name] is None, name
        else:
            assert_close_rel(grads[name], g_ref[name], tol_g)


def test_cross_scan_is_bit_identical_across_calls_and_thread_counts():
    tensors, perms = cross_inputs(3, 2, 130, 300, 8, False, seed=5)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            runs.append(run_cross(_cross_cpu(perms), tensors, True, True))
    finally:
        torch.set_num_threads(before)
    (y, grads), rest = runs[0], runs[1:]
    for y2, grads2 in rest:
        assert torch.equal(y, y2)
        for name in CROSS_NAMES:
            assert torch.equal(grads[name], grads2[name]), name


def test_cross_scan_in_pixel_order_equals_the_plain_kernel_bit_for_bit():
    # identity orders: the fused kernels read what the plain ones read, in another layout
    b, k, d, length = 2, 4, 67, 150
    tensors, _ = cross_inputs(b, k, d, length, 16, False, seed=3)
    perms = torch.arange(length).repeat(k, 1)
    y, grads = run_cross(_cross_cpu(perms), tensors, True, True)

    def plain(t):
        u = t["x"][:, None].expand(b, k, d, length).reshape(b, k * d, length)
        args = (u, t["delta"].reshape(b, k * d, length), t["A"], t["B"], t["C"], t["D"], t["delta_bias"])
        out = ss_cpu.selective_scan_cpu(*args, delta_softplus=True).view(b, k, d, length)
        total = out[:, 0].clone()  # the directions summed in the fused wrapper's order
        for i in range(1, k):
            total += out[:, i]
        return total

    y_plain, grads_plain = run_cross(plain, tensors, True, True)
    assert torch.equal(y, y_plain)
    for name in ("delta", "A", "B", "C", "D", "delta_bias"):
        assert torch.equal(grads[name], grads_plain[name]), name
    # autograd's expand sums the K directions' gradients in its own order: K - 1 roundings each
    assert_close_rel(grads["x"], grads_plain["x"], 2 * gamma32(k))


def test_cross_scan_names_a_wrong_argument():
    tensors, perms = cross_inputs(1, 2, 4, 6, 3, False)
    tensors["delta"] = tensors["delta"][:, :, :3]
    with pytest.raises(
        ValueError, match=r"cross scan: delta has shape \(1, 2, 3, 6\), expected \(1, 2, 4, 6\)"
    ):
        _cross_cpu(perms)(tensors)
    tensors, perms = cross_inputs(1, 2, 4, 6, 3, False)
    perms[1, 2] = 6  # one past the last pixel: the kernels would read outside the tensors
    with pytest.raises(ValueError, match=r"each row of perms must visit the 6 pixels 0..5 once each"):
        _cross_cpu(perms)(tensors)
    # the channels-last entry (SS2D's) checks the same on pixel-order views
    t = tensors
    channels_last = (t["x"].transpose(1, 2), t["delta"].permute(1, 0, 3, 2), t["A"])
    channels_last += (t["B"].permute(0, 3, 1, 2), t["C"].permute(0, 3, 1, 2), t["D"], t["delta_bias"])
    with pytest.raises(ValueError, match="each row of perms must visit"):
        ss_cpu.cross_scan_cpu_channels_last(*channels_last, perms)


def test_scan_orders_must_be_permutations_checked_once_per_table(monkeypatch):
    from model.ops import scan_reference

    tensors, perms = cross_inputs(1, 2, 4, 6, 3, False)
    perms[0, 3] = perms[0, 2]  # in range, but a pixel visited twice and one never: uninitialised outputs
    with pytest.raises(ValueError, match="a row repeats or skips a pixel"):
        _cross_cpu(perms)(tensors)
    tensors, perms = cross_inputs(1, 2, 4, 6, 3, False)
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda t, *a, **kw: sorts.append(1) or real_sort(t, *a, **kw))
    for _ in range(3):
        _cross_cpu(perms)(tensors)
    assert len(sorts) == 1  # one check for the table, not one per call
    perms[1, [0, 1]] = perms[1, [1, 0]]  # changed in place (still a permutation): checked again
    _cross_cpu(perms)(tensors)
    assert len(sorts) == 2
    perms[1, 0] = perms[1, 1]
    with pytest.raises(ValueError, match="once each"):
        scan_reference.check_orders(perms)


@pytest.mark.parametrize(
    ("method", "k", "groups"), [("hilbert", 8, 1), ("zigzag", 4, 1), ("zigzag+hilbert", 4, 4)]
)
def test_ss2d_takes_the_fused_channels_last_path(monkeypatch, method, k, groups):
    from model.mambaad.scan_orders import ScanOptions
    from model.mambaad.ss2d import SS2D

    calls = []
    fused = ss_cpu.cross_scan_cpu_channels_last
    monkeypatch.setattr(
        ss_cpu, "cross_scan_cpu_channels_last", lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    )
    torch.manual_seed(0)
    m = SS2D(d_model=36, d_state=4, size=5, scan=ScanOptions(method=method, directions=k, grouped=groups > 1))
    with torch.no_grad():
        m.x_proj_weight.normal_(0, 0.5)
        m.A_logs.add_(torch.randn_like(m.A_logs) * 0.1)
        m.Ds.normal_()
    x = torch.randn(2, 5, 6, 36)
    weight = torch.randn(2, 5, 6, 36)

    y_ref, g_ref = run_ss2d(m, x, weight, "ref")
    assert not calls
    y, grads = run_ss2d(m, x, weight, "cpu")
    assert calls == [1]
    tol_y, tol_g = ss2d_bounds(m, x)
    assert_close_rel(y, y_ref, tol_y)
    for name, g in g_ref.items():
        assert_close_rel(grads[name], g, tol_g)
