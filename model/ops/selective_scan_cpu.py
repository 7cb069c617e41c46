# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""CPU selective scan: Numba kernels for the forward and backward pass (backend ``cpu``).

Same semantics and shapes as :func:`model.ops.selective_scan.selective_scan_fn`. The
PyTorch backends spend their time in thousands of small tensor ops and keep every state
``h_t`` for backward (``b*K*d*L*N`` floats); these kernels run fused loops instead.
Forward runs a block of ``_LANES`` channels of one group at a time, the channels being the
SIMD lanes (they share B_t and C_t, and their sum over the N states keeps the order of the
plain definition), and keeps only the current states. Backward recomputes the states of
one channel at a time into a small scratch buffer (``L*N`` floats per thread) and walks
back through time, so the autograd graph holds nothing but the inputs.

Every transcendental function in the loops (exp, 2**x, log, softplus) is written with
arithmetic and selects only, so that LLVM vectorises them: Numba has no vector exp without
Intel SVML, and a scalar libm call costs more than the whole state update.

Numba is optional: without it this module still imports, :data:`NUMBA_AVAILABLE` is False
and :func:`selective_scan_cpu` raises ``ValueError``. Kernels are compiled on first use
(``cache=True`` keeps the machine code in ``__pycache__`` for later processes).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

try:
    import numba
except ImportError:
    numba = None

NUMBA_AVAILABLE = numba is not None

# torch.nn.functional.softplus switches to the identity above this input (beta = 1).
_SOFTPLUS_THRESHOLD = np.float32(20.0)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)

# exp for float32 (Cephes expf: range reduction by ln 2 and a degree-7 polynomial, a few ulp).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_POLY = tuple(
    np.float32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)
)
_HALF = np.float32(0.5)
_EXP_MIN = np.float32(-87.33654)  # ln of the smallest normal float: below it, 0 (as with flushed denormals)
_EXP_MAX = np.float32(88.72283)  # ln of the largest float: above it, inf
_INF = np.float32(np.inf)
# log for float32 (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)) and a degree-9 polynomial).
_LOG_POLY = tuple(
    np.float32(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)
_SQRT2 = np.float32(1.4142135623730951)
# 2**r on [-0.5, 0.5] (Cephes exp2f, about 1 ulp); 2**k goes straight into the exponent bits.
_EXP2_POLY = tuple(
    np.float32(c)
    for c in (
        1.535336188319500e-4,
        1.339887440266574e-3,
        9.618437357674640e-3,
        5.550332471162809e-2,
        2.402264791363012e-1,
        6.931472028550421e-1,
    )
)
_EXP2_MIN = np.float32(-126.0)  # 2**-126, the smallest normal float, stands in for anything smaller
_EXP2_MAX = np.float32(128.0)  # gives exactly inf
_ROUND = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the low bits
# Forward blocking: channels per task (SIMD lanes, a runtime loop bound so that LLVM
# vectorises rather than unrolls it) and time steps staged per pass (the per-step rows of
# 64 lanes then stay in the 32 KB L1 cache). Measured best of 32/64/128 x 8/16/32/64.
_LANES = 64
_CHUNK = 16

if NUMBA_AVAILABLE:
    _jit = numba.njit(parallel=True, fastmath={"contract"}, cache=True)
    _inline = numba.njit(fastmath={"contract"}, cache=True, inline="always")
    prange = numba.prange

    @_inline
    def _exp(x):
        """exp(x) in float32 from arithmetic and selects only, so loops over it vectorise."""
        xc = min(max(x, _EXP_MIN), _EXP_MAX)
        k = np.floor(xc * _LOG2E + _HALF)
        r = xc - k * _LN2_HI - k * _LN2_LO
        p0, p1, p2, p3, p4 = _EXP_POLY
        p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + _HALF
        p = p * (r * r) + r + _ONE
        # 2**k as two exact power-of-two factors, so that k = -126 and k = 128 stay in range.
        ki = np.int32(k)
        k1 = ki >> 1
        res = (
            p * np.int32((k1 + 127) << 23).view(np.float32) * np.int32((ki - k1 + 127) << 23).view(np.float32)
        )
        res = _ZERO if x < _EXP_MIN else res
        res = _INF if x > _EXP_MAX else res
        return x if x != x else res

    @_inline
    def _exp2(z):
        """2**z in float32 (about 1 ulp) for the hot loops: 2**-126 for anything smaller, inf above 128.

        The decay a multiplies a state that is at most a few orders of magnitude large, so the
        difference between 2**-126 and 0 never reaches an fp32 output (with denormals flushed).
        """
        zc = min(max(z, _EXP2_MIN), _EXP2_MAX)
        t = zc + _ROUND
        r = zc - (t - _ROUND)
        e0, e1, e2, e3, e4, e5 = _EXP2_POLY
        p = (((((e0 * r + e1) * r + e2) * r + e3) * r + e4) * r + e5) * r + _ONE
        return np.int32(np.float32(p).view(np.int32) + (np.float32(t).view(np.int32) << 23)).view(np.float32)

    @_inline
    def _log(x):
        """log(x) in float32 for finite x >= 1 (Cephes logf), from arithmetic and selects only."""
        bits = np.float32(x).view(np.int32)
        e = np.float32((bits >> 23) - 127)
        m = np.int32((bits & 0x7FFFFF) | 0x3F800000).view(np.float32)
        big = m > _SQRT2
        m = m * _HALF if big else m
        e = e + _ONE if big else e
        f = m - _ONE
        z = f * f
        q0, q1, q2, q3, q4, q5, q6, q7, q8 = _LOG_POLY
        y = ((((((((q0 * f + q1) * f + q2) * f + q3) * f + q4) * f + q5) * f + q6) * f + q7) * f + q8) * f * z
        y = y + e * _LN2_LO - _HALF * z
        return f + y + e * _LN2_HI

    @_inline
    def _softplus(raw):
        """torch's softplus log1p(exp(raw)) (identity above the threshold), NaN kept."""
        e = _exp(raw)
        up = _ONE + e
        res = _log(up) - ((up - _ONE) - e) / up
        return raw if (raw > _SOFTPLUS_THRESHOLD or raw != raw) else res

    @_jit
    def _forward_kernel(u, delta, A, Bt, Ct, D, bias, softplus, out, lanes):
        """out[b, c, t] = y_t; parallel over blocks of ``lanes`` channels of one group.

        Per chunk of ``_CHUNK`` steps: delta' of the block's channels (softplus vectorised
        over the chunk), then delta' and delta' * u transposed to one row of lanes per step,
        then the state update for all lanes at once, 4 states per pass (the sum over the
        states into y stays in state order), then y + D * u written back.
        """
        batch, channels, length = u.shape
        groups = Bt.shape[1]
        n_state = A.shape[1]
        per_group = channels // groups
        blocks = (per_group + lanes - 1) // lanes
        for item in prange(batch * groups * blocks):
            bi = item // (groups * blocks)
            k = (item // blocks) % groups
            c0 = k * per_group + (item % blocks) * lanes
            width = min(lanes, (k + 1) * per_group - c0)
            A_blk = np.zeros((n_state, lanes), dtype=np.float32)
            h = np.zeros((n_state, lanes), dtype=np.float32)
            steps = np.zeros((_CHUNK, lanes), dtype=np.float32)
            inputs = np.zeros((_CHUNK, lanes), dtype=np.float32)
            ys = np.zeros((_CHUNK, lanes), dtype=np.float32)
            raw = np.zeros(lanes * _CHUNK, dtype=np.float32)
            for j in range(width):
                for n in range(n_state):
                    A_blk[n, j] = A[c0 + j, n] * _LOG2E
            for t0 in range(0, length, _CHUNK):
                span = min(_CHUNK, length - t0)
                for j in range(width):
                    c = c0 + j
                    bc = bias[c]
                    for s in range(span):
                        raw[j * _CHUNK + s] = delta[bi, c, t0 + s] + bc
                if softplus:
                    for i in range(width * _CHUNK):
                        raw[i] = _softplus(raw[i])
                for j in range(width):
                    c = c0 + j
                    for s in range(span):
                        dt = raw[j * _CHUNK + s]
                        steps[s, j] = dt
                        inputs[s, j] = dt * u[bi, c, t0 + s]
                ys[:] = _ZERO
                for s in range(span):
                    B_t = Bt[bi, k, t0 + s]
                    C_t = Ct[bi, k, t0 + s]
                    dt_s = steps[s]
                    in_s = inputs[s]
                    y_s = ys[s]
                    for n in range(0, n_state - 3, 4):
                        b0, b1, b2, b3 = B_t[n], B_t[n + 1], B_t[n + 2], B_t[n + 3]
                        q0, q1, q2, q3 = C_t[n], C_t[n + 1], C_t[n + 2], C_t[n + 3]
                        h0, h1, h2, h3 = h[n], h[n + 1], h[n + 2], h[n + 3]
                        a0, a1, a2, a3 = A_blk[n], A_blk[n + 1], A_blk[n + 2], A_blk[n + 3]
                        for j in range(lanes):
                            dt = dt_s[j]
                            inp = in_s[j]
                            x0 = _exp2(dt * a0[j]) * h0[j] + inp * b0
                            x1 = _exp2(dt * a1[j]) * h1[j] + inp * b1
                            x2 = _exp2(dt * a2[j]) * h2[j] + inp * b2
                            x3 = _exp2(dt * a3[j]) * h3[j] + inp * b3
                            h0[j] = x0
                            h1[j] = x1
                            h2[j] = x2
                            h3[j] = x3
                            y_s[j] = (((y_s[j] + q0 * x0) + q1 * x1) + q2 * x2) + q3 * x3
                    for n in range(n_state - n_state % 4, n_state):
                        b_n = B_t[n]
                        c_n = C_t[n]
                        h_n = h[n]
                        a_n = A_blk[n]
                        for j in range(lanes):
                            x = _exp2(dt_s[j] * a_n[j]) * h_n[j] + in_s[j] * b_n
                            h_n[j] = x
                            y_s[j] += c_n * x
                for j in range(width):
                    c = c0 + j
                    dc = D[c]
                    for s in range(span):
                        out[bi, c, t0 + s] = ys[s, j] + dc * u[bi, c, t0 + s]

    @_jit
    def _backward_kernel(u, delta, A, Bt, Ct, D, bias, softplus, dout, du, ddelta, dA, dBt, dCt, dD, dbias):
        """Gradients of sum(dout * y).

        Parallel over (batch, group): a task owns dBt/dCt[b, k] and loops over the group's
        channels, so the reduction of the B/C grads over channels needs no atomics. Per
        channel it computes delta' and the softplus gate for all t (vectorised), recomputes
        and stores h_t and exp(delta'_t A) for all t (as forward does), then runs the adjoint
        recurrence g_t = dy_t C_t + a_{t+1} g_{t+1} backwards; the per-state terms of the
        delta and u grads go to small arrays summed afterwards, so the loop over the states
        has no scalar reduction and vectorises. dA, dD and dbias get one row per batch
        element (the caller sums over b); they accumulate in float64.
        """
        batch, channels, length = u.shape
        groups = Bt.shape[1]
        n_state = A.shape[1]
        per_group = channels // groups
        for item in prange(batch * groups):
            bi = item // groups
            k = item % groups
            states = np.zeros((length + 1, n_state), dtype=np.float32)  # row t+1 holds h_t
            decay = np.empty((length, n_state), dtype=np.float32)
            steps = np.empty(length, dtype=np.float32)
            gates = np.empty(length, dtype=np.float32)
            carry = np.empty(n_state, dtype=np.float32)
            A2 = np.empty(n_state, dtype=np.float32)
            ddt_terms = np.empty(n_state, dtype=np.float32)
            dbu_terms = np.empty(n_state, dtype=np.float32)
            dA_acc = np.empty(n_state, dtype=np.float64)
            for j in range(per_group):
                c = k * per_group + j
                A_c = A[c]
                bc = bias[c]
                for n in range(n_state):
                    A2[n] = A_c[n] * _LOG2E
                for t in range(length):
                    steps[t] = delta[bi, c, t] + bc
                if softplus:
                    for t in range(length):
                        raw = steps[t]
                        e = _exp(raw)
                        gates[t] = _ONE if raw > _SOFTPLUS_THRESHOLD else e / (_ONE + e)
                        steps[t] = _softplus(raw)
                else:
                    gates[:] = _ONE
                for t in range(length):
                    dt = steps[t]
                    dtu = dt * u[bi, c, t]
                    B_t = Bt[bi, k, t]
                    a_t = decay[t]
                    h_prev = states[t]
                    h_t = states[t + 1]
                    for n in range(n_state):
                        a = _exp2(dt * A2[n])
                        a_t[n] = a
                        h_t[n] = a * h_prev[n] + dtu * B_t[n]
                carry[:] = _ZERO
                dA_acc[:] = 0.0
                dD_acc = 0.0
                dbias_acc = 0.0
                for t in range(length - 1, -1, -1):
                    dy = dout[bi, c, t]
                    dt = steps[t]
                    ut = u[bi, c, t]
                    dtu = dt * ut
                    B_t = Bt[bi, k, t]
                    C_t = Ct[bi, k, t]
                    dB_t = dBt[bi, k, t]
                    dC_t = dCt[bi, k, t]
                    a_t = decay[t]
                    h_prev = states[t]
                    h_t = states[t + 1]
                    for n in range(n_state):
                        g = dy * C_t[n] + carry[n]
                        a = a_t[n]
                        dC_t[n] += dy * h_t[n]
                        dB_t[n] += g * dtu
                        g_decay = g * h_prev[n] * a
                        dA_acc[n] += g_decay * dt
                        gb = g * B_t[n]
                        ddt_terms[n] = g_decay * A_c[n] + gb * ut
                        dbu_terms[n] = gb
                        carry[n] = a * g
                    ddt = _ZERO
                    dbu = _ZERO
                    for n in range(n_state):
                        ddt += ddt_terms[n]
                        dbu += dbu_terms[n]
                    du[bi, c, t] = dbu * dt + D[c] * dy
                    draw = ddt * gates[t]
                    ddelta[bi, c, t] = draw
                    dD_acc += dy * ut
                    dbias_acc += draw
                dA[bi, c, :] = dA_acc
                dD[bi, c] = dD_acc
                dbias[bi, c] = dbias_acc


_pool_started = False


def start_thread_pool() -> None:
    """Start Numba's thread pool once, keeping torch's own thread count.

    Numba's OpenMP layer shares the OpenMP runtime with torch, and starting it resets torch
    to one thread per core (e.g. ``OMP_NUM_THREADS=1`` silently became 2 threads here): that
    oversubscribes busy machines and makes the first steps of a run numerically different
    from later ones. Callers that want identical runs start the pool before any other work.
    """
    global _pool_started
    if _pool_started:
        return
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _pool_started = True


def _set_threads() -> None:
    """Run the kernels on as many threads as torch uses (capped by Numba's pool size)."""
    start_thread_pool()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _arrays(u, delta, A, B, C, D, delta_bias):
    """Contiguous fp32 tensors for the kernels (no copy when already so); B, C as [b, K, L, N]."""
    channels = u.shape[1]

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32).contiguous()

    zeros = torch.zeros(channels, dtype=torch.float32)
    return (
        f32(u),
        f32(delta),
        f32(A),
        f32(B.transpose(-1, -2)),
        f32(C.transpose(-1, -2)),
        zeros if D is None else f32(D),
        zeros if delta_bias is None else f32(delta_bias),
    )


class SelectiveScanCPU(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs; backward recomputes the states in the kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        arrays = _arrays(u, delta, A, B, C, D, delta_bias)
        out = torch.empty(u.shape, dtype=torch.float32)
        _set_threads()
        _forward_kernel(*(t.numpy() for t in arrays), delta_softplus, out.numpy(), _LANES)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        arrays = _arrays(u, delta, A, B, C, D, delta_bias)
        u32, _, _, Bt, Ct, _, _ = arrays
        batch, channels, _ = u32.shape
        du = torch.empty_like(u32)
        ddelta = torch.empty_like(u32)
        dA = torch.empty((batch, *A.shape), dtype=torch.float64)
        dBt = torch.zeros_like(Bt)
        dCt = torch.zeros_like(Ct)
        dD = torch.empty((batch, channels), dtype=torch.float64)
        dbias = torch.empty((batch, channels), dtype=torch.float64)
        grad_out = grad_out.to(torch.float32).contiguous()
        _set_threads()
        _backward_kernel(
            *(t.numpy() for t in arrays),
            ctx.delta_softplus,
            grad_out.numpy(),
            *(t.numpy() for t in (du, ddelta, dA, dBt, dCt, dD, dbias)),
        )
        need = ctx.needs_input_grad
        grads = (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA.sum(0).to(A.dtype),
            dBt.transpose(-1, -2).to(B.dtype),
            dCt.transpose(-1, -2).to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
        )
        return (*(g if wanted else None for g, wanted in zip(grads, need)), None)


def selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan on CPU tensors with the Numba kernels; fp32 ``[b, K*d, L]``, differentiable.

    Raises ``ValueError`` when Numba is missing. The arguments are checked by
    :func:`model.ops.selective_scan.selective_scan_fn` (call it with ``backend="cpu"``), not here.
    """
    if not NUMBA_AVAILABLE:
        raise ValueError("selective-scan backend 'cpu' needs numba (pip install numba)")
    return SelectiveScanCPU.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
