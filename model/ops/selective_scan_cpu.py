# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""CPU selective scan: Numba kernels for the forward and backward pass (backend ``cpu``).

Same semantics and shapes as :func:`model.ops.selective_scan.selective_scan_fn`. The
PyTorch backends spend their time in thousands of small tensor ops and keep every state
``h_t`` for backward (``b*K*d*L*N`` floats); these kernels run fused loops instead.
Both passes run a block of 64 channels of one group at a time, the channels being the SIMD
lanes (they share B_t and C_t; sums over the N states keep the order of the plain
definition). Forward keeps only the current states. Backward runs the block forward once,
keeping delta' and delta' u of every step and the state at every 64th step, then goes
back chunk by chunk: it recomputes the chunk's states from its checkpoint into a small
buffer and runs the adjoint recurrence back through them. So the autograd graph holds
nothing but the inputs, and a backward thread's scratch (:func:`backward_scratch_bytes`:
0.8 MB plus ``2.25 * 64`` floats per step for N = 16) does not grow with the batch or the
channels. Gradients are bit-identical from run to run, whatever the number of threads:
each task writes its own outputs, and every sum has a fixed order.

The same kernels, given a table of scan orders, also run SS2D's K-direction scan fused
(:func:`cross_scan_cpu_channels_last`): every tensor in pixel order and channels-last, each
step reading the block's channels of the pixel it visits, so SS2D never gathers its input
into the K scan orders nor scatters outputs and gradients back.

Every transcendental function in the loops (exp, 2**x, log, softplus) is written with
arithmetic and selects only, so that LLVM vectorises them: Numba has no vector exp without
Intel SVML, and a scalar libm call costs more than the whole state update.

Numba is optional: without it this module still imports, :data:`NUMBA_AVAILABLE` is False
and :func:`selective_scan_cpu` raises ``ValueError``. Kernels are compiled on first use
(``cache=True`` keeps the machine code in ``__pycache__`` for later processes).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

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
# Backward blocking: lanes per block and steps per recomputed chunk, which is also the
# checkpoint spacing (the chunk's states and decays, 2 * 64 * 16 * 64 floats, stay in a
# 1 MB L2; measured 16/32/64/128 steps and 32/64 lanes); scratch rows of [state, lane],
# [step, lane] and columns of [lane, step] for one chunk.
_BWD_LANES = 64
_BWD_CHUNK = 64
_STATE_ROWS = 5
_STEP_ROWS = 3
_LANE_COLS = 8

if NUMBA_AVAILABLE:
    # error_model="numpy": no zero-division check (a branch) in float divisions, which kept
    # LLVM from vectorising the softplus loops; no division here can have a zero divisor.
    _jit = numba.njit(parallel=True, fastmath={"contract"}, error_model="numpy", cache=True)
    _inline = numba.njit(fastmath={"contract"}, error_model="numpy", cache=True, inline="always")
    _nogil = numba.njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
    _reduce = numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)
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
    def _forward_kernel(u, delta, A, Bt, Ct, D, bias, softplus, out, lanes, order):
        """out[b, c, t] = y_t; parallel over blocks of ``lanes`` channels of one group.

        ``order [K, L]`` (empty: none) makes it SS2D's fused cross-scan, every tensor in pixel
        order, group ``k`` visiting pixel ``order[k, t]`` at step ``t``: ``u [b, L, C]``
        channels-last, channel ``c`` reading channel ``c % C`` (all directions share the image's
        channels); ``delta`` and ``out`` direction-major channels-last ``[K*b, L, d]`` (row
        ``k*b + bi``); Bt and Ct ``[b, K, L, N]``. A step then loads the block's channels of one
        pixel, one contiguous run.

        Per chunk of ``_CHUNK`` steps: delta' of the block's channels (softplus vectorised
        over the chunk), then delta' and delta' * u transposed to one row of lanes per step,
        then the state update for all lanes at once, 4 states per pass (the sum over the
        states into y stays in state order), then y + D * u written back.
        """
        fused = order.shape[0] > 0
        groups = Bt.shape[1]
        batch = u.shape[0]
        channels = groups * delta.shape[2] if fused else delta.shape[1]
        length = delta.shape[1] if fused else delta.shape[2]
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
            us = np.zeros(lanes * _CHUNK, dtype=np.float32)
            u_steps = np.zeros((_CHUNK, lanes), dtype=np.float32)
            bias_blk = np.zeros(lanes, dtype=np.float32)
            cu0 = c0 % u.shape[2] if fused else 0  # the block's first channel in u
            row = k * batch + bi  # the direction-major row of delta and out
            cd0 = c0 - k * per_group  # and the block's first channel there
            for j in range(width):
                bias_blk[j] = bias[c0 + j]
                for n in range(n_state):
                    A_blk[n, j] = A[c0 + j, n] * _LOG2E
            for t0 in range(0, length, _CHUNK):
                span = min(_CHUNK, length - t0)
                if fused:  # one contiguous run of the block's channels per step, no transposes
                    for s in range(span):
                        pixel = order[k, t0 + s]
                        d_row = delta[row, pixel, cd0 : cd0 + width]
                        u_row = u[bi, pixel, cu0 : cu0 + width]
                        dt_s = steps[s]
                        in_s = inputs[s]
                        u_s = u_steps[s]
                        for j in range(width):
                            dt = d_row[j] + bias_blk[j]
                            if softplus:
                                dt = _softplus(dt)
                            dt_s[j] = dt
                            in_s[j] = dt * u_row[j]
                            u_s[j] = u_row[j]
                else:
                    for j in range(width):
                        c = c0 + j
                        bc = bias[c]
                        # rows sliced and indexed from 0: with delta[bi, c, t0 + s], the check for
                        # negative indices turns contiguous loads into gathers
                        d_row = delta[bi, c, t0 : t0 + span]
                        u_row = u[bi, c, t0 : t0 + span]
                        for s in range(span):
                            raw[j * _CHUNK + s] = d_row[s] + bc
                            us[j * _CHUNK + s] = u_row[s]
                    if softplus:
                        for i in range(width * _CHUNK):
                            raw[i] = _softplus(raw[i])
                    for j in range(width):
                        for s in range(span):
                            dt = raw[j * _CHUNK + s]
                            steps[s, j] = dt
                            inputs[s, j] = dt * us[j * _CHUNK + s]
                ys[:] = _ZERO
                for s in range(span):
                    t = order[k, t0 + s] if fused else t0 + s
                    B_t = Bt[bi, k, t]
                    C_t = Ct[bi, k, t]
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
                if fused:
                    for s in range(span):
                        o_row = out[row, order[k, t0 + s], cd0 : cd0 + width]
                        y_s = ys[s]
                        u_s = u_steps[s]
                        for j in range(width):
                            o_row[j] = y_s[j] + D[c0 + j] * u_s[j]
                else:
                    for j in range(width):
                        c = c0 + j
                        dc = D[c]
                        out_row = out[bi, c, t0 : t0 + span]
                        for s in range(span):
                            out_row[s] = ys[s, j] + dc * us[j * _CHUNK + s]

    @_reduce
    def _rows_dot(rows, weights, span, out):
        """out[s, n] += sum_j rows[s, n, j] * weights[s, j] for s < span: a chunk's B or C grads.

        The sums over the lanes are the only place where LLVM may reassociate (so that they
        vectorise); the order is fixed by the compiled code, not by the data or the thread
        count, so results are reproducible bit for bit. The other loops keep strict order.
        """
        n_state = rows.shape[1]
        lanes = rows.shape[2]
        for s in range(span):
            w = weights[s]
            for n in range(n_state):
                r = rows[s, n]
                total = _ZERO
                for j in range(lanes):
                    total += r[j] * w[j]
                out[s, n] += total

    @_nogil
    def _backward_scratch_sizes(length, n_state, lanes):
        """(float32, float64) element counts of the scratch a backward thread passes its tasks.

        float32: the state at every chunk start (checkpoints) and delta', delta' u of every
        step, all [step, lane]; for one chunk the recomputed states (one row more) and decays,
        ``_STATE_ROWS`` rows of [state, lane], ``_STEP_ROWS`` of [step, lane] and
        ``_LANE_COLS`` of [lane, step]. float64: the dA, dD and dbias sums of a block.
        """
        chunks = (length + _BWD_CHUNK - 1) // _BWD_CHUNK
        per_state = n_state * lanes
        per_step = _BWD_CHUNK * lanes
        f32 = (chunks + 2 * _BWD_CHUNK + 1 + _STATE_ROWS) * per_state
        f32 += (2 * chunks + _STEP_ROWS + _LANE_COLS) * per_step
        return f32, per_state + 2 * per_step

    @_inline
    def _gather(src, bi, c0, width, t0, span, bias, add_bias, cols, order, k, row, cs):
        """cols[j * _BWD_CHUNK + s] = src[bi, c0 + j, t0 + s] (+ bias[c0 + j]), contiguous runs of
        steps per channel; zero for the steps past ``span`` of a last, partial chunk. With an
        ``order`` (fused cross-scan, channels-last ``src``): cols[s * lanes + j] =
        src[row, order[k, t0 + s], cs + j], one contiguous run of channels per step."""
        if order.shape[0] > 0:
            lanes = cols.shape[0] // _BWD_CHUNK
            for s in range(span):
                run = src[row, order[k, t0 + s], cs : cs + width]
                for j in range(width):
                    cols[s * lanes + j] = run[j] + (bias[c0 + j] if add_bias else _ZERO)
            for i in range(span * lanes, _BWD_CHUNK * lanes):
                cols[i] = _ZERO
            return
        for j in range(width):
            # a slice indexed from 0: with src[bi, c, t0 + s], the check for negative indices
            # turns the contiguous loads into gathers
            row = src[bi, c0 + j, t0 : t0 + span]
            add = bias[c0 + j] if add_bias else _ZERO
            for s in range(span):
                cols[j * _BWD_CHUNK + s] = row[s] + add
            for s in range(span, _BWD_CHUNK):
                cols[j * _BWD_CHUNK + s] = _ZERO

    @_inline
    def _scatter(cols, bi, c0, width, t0, span, dst, order, k, row, cs):
        """dst[bi, c0 + j, t0 + s] = cols[j * _BWD_CHUNK + s] for the chunk's ``span`` steps
        (channels-last dst[row, order[k, t0 + s], cs + j] = cols[s * lanes + j] with an ``order``)."""
        if order.shape[0] > 0:
            lanes = cols.shape[0] // _BWD_CHUNK
            for s in range(span):
                run = dst[row, order[k, t0 + s], cs : cs + width]
                for j in range(width):
                    run[j] = cols[s * lanes + j]
            return
        for j in range(width):
            row = dst[bi, c0 + j, t0 : t0 + span]
            for s in range(span):
                row[s] = cols[j * _BWD_CHUNK + s]

    @_inline
    def _to_rows(cols, rows, fused):
        """rows[s, j] = cols[j * _BWD_CHUNK + s]: [lane, step] to [step, lane] (a copy when
        ``fused``: the fused cross-scan keeps cols in [step, lane] layout)."""
        if fused:
            lanes = rows.shape[1]
            for s in range(_BWD_CHUNK):
                r = rows[s]
                for j in range(lanes):
                    r[j] = cols[s * lanes + j]
            return
        for s in range(_BWD_CHUNK):
            r = rows[s]
            for j in range(rows.shape[1]):
                r[j] = cols[j * _BWD_CHUNK + s]

    @_inline
    def _to_cols(rows, cols, fused):
        """cols[j * _BWD_CHUNK + s] = rows[s, j]: [step, lane] to [lane, step] (a copy when
        ``fused``)."""
        if fused:
            lanes = rows.shape[1]
            for s in range(_BWD_CHUNK):
                r = rows[s]
                for j in range(lanes):
                    cols[s * lanes + j] = r[j]
            return
        for j in range(rows.shape[1]):
            for s in range(_BWD_CHUNK):
                cols[j * _BWD_CHUNK + s] = rows[s, j]

    @_inline
    def _copy(src, dst):
        """dst[:] = src for [state, lane] arrays, as a loop (a slice assignment between views of
        one buffer makes a temporary copy)."""
        for n in range(src.shape[0]):
            for j in range(src.shape[1]):
                dst[n, j] = src[n, j]

    @_nogil
    def _backward_tasks(
        u,
        delta,
        A,
        Bt,
        Ct,
        D,
        bias,
        softplus,
        dout,
        du,
        ddelta,
        dA,
        dBt,
        dCt,
        dD,
        dbias,
        lanes,
        order,
        f32,
        f64,
        first,
        step,
    ):
        """Gradients of sum(dout * y) for the (batch, group) tasks first, first + step, ...

        A task owns dBt/dCt[b, k] and runs the group's blocks of ``lanes`` channels one after
        the other, so the B/C grads are summed over the lanes of a block (:func:`_rows_dot`)
        and then over the blocks in a fixed order, without atomics. A block runs all its
        lanes at once (they share B_t and C_t): a forward pass stores delta' and delta' u of
        every step and the state at the start of every chunk of ``_BWD_CHUNK`` steps; then,
        chunk by chunk from the last, the states and decays of the chunk are recomputed from
        its checkpoint and the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} runs back through it.
        Per-step values move between [channel, time] and [step, lane] in contiguous runs of
        ``_BWD_CHUNK`` steps. dA, dD and dbias get one float64 row per batch element.
        ``f32`` and ``f64`` are the scratch (:func:`_backward_scratch_sizes`); whatever they
        hold, a block reads only what it wrote (a partial block zeroes them first). With an
        ``order`` (fused cross-scan, see :func:`_forward_kernel`) every tensor but dBt and dCt,
        which stay in scan order, is in pixel order; dout is laid out like u, du and ddelta
        like delta.
        """
        fused = order.shape[0] > 0
        batch = u.shape[0]
        channels = Bt.shape[1] * delta.shape[2] if fused else delta.shape[1]
        length = delta.shape[1] if fused else delta.shape[2]
        groups = Bt.shape[1]
        n_state = A.shape[1]
        per_group = channels // groups
        blocks = (per_group + lanes - 1) // lanes
        chunks = (length + _BWD_CHUNK - 1) // _BWD_CHUNK
        per_state = n_state * lanes
        per_step = _BWD_CHUNK * lanes
        padded = chunks * _BWD_CHUNK
        ckpt = f32[: chunks * per_state].reshape((chunks, n_state, lanes))
        o = chunks * per_state
        all_steps = f32[o : o + padded * lanes].reshape((padded, lanes))
        o += padded * lanes
        all_inputs = f32[o : o + padded * lanes].reshape((padded, lanes))
        o += padded * lanes
        states = f32[o : o + (_BWD_CHUNK + 1) * per_state].reshape((_BWD_CHUNK + 1, n_state, lanes))
        o += (_BWD_CHUNK + 1) * per_state
        decay = f32[o : o + _BWD_CHUNK * per_state].reshape((_BWD_CHUNK, n_state, lanes))
        o += _BWD_CHUNK * per_state
        state_rows = f32[o : o + _STATE_ROWS * per_state].reshape((_STATE_ROWS, n_state, lanes))
        o += _STATE_ROWS * per_state
        step_rows = f32[o : o + _STEP_ROWS * per_step].reshape((_STEP_ROWS, _BWD_CHUNK, lanes))
        o += _STEP_ROWS * per_step
        cols = f32[o:].reshape((_LANE_COLS, per_step))
        # one name per row (unpacking an array would lose its contiguous layout)
        A2 = state_rows[0]
        A_blk = state_rows[1]
        h = state_rows[2]
        carry = state_rows[3]
        dA_chunk = state_rows[4]
        dys = step_rows[0]
        ddts = step_rows[1]
        dbus = step_rows[2]
        dts = cols[0]
        gates = cols[1]
        us = cols[2]
        ins = cols[3]
        dycol = cols[4]
        ddtcol = cols[5]
        dbucol = cols[6]
        dcol = cols[7]
        dA_acc = f64[:per_state].reshape((n_state, lanes))
        dD_acc = f64[per_state : per_state + per_step]
        dbias_acc = f64[per_state + per_step :]
        for item in range(first, batch * groups, step):
            bi = item // groups
            k = item % groups
            Bt_k = Bt[bi, k]
            Ct_k = Ct[bi, k]
            for blk in range(blocks):
                c0 = k * per_group + blk * lanes
                width = min(lanes, (k + 1) * per_group - c0)
                row = k * batch + bi  # fused: direction-major row and first channel of delta, du, ddelta
                cd0 = blk * lanes
                cu0 = c0 % u.shape[2]  # and the block's first channel in u and dout
                cy0 = c0 % dout.shape[2]
                if width < lanes:  # lanes past the group are zero and contribute nothing
                    f32[:] = _ZERO
                for j in range(width):
                    for s in range(_BWD_CHUNK):
                        dcol[s * lanes + j if fused else j * _BWD_CHUNK + s] = D[c0 + j]
                    for n in range(n_state):
                        A2[n, j] = A[c0 + j, n] * _LOG2E
                        A_blk[n, j] = A[c0 + j, n]
                # forward: delta', delta' u and the checkpoints
                h[:] = _ZERO
                for ci in range(chunks):
                    t0 = ci * _BWD_CHUNK
                    span = min(_BWD_CHUNK, length - t0)
                    _copy(h, ckpt[ci])
                    _gather(delta, bi, c0, width, t0, span, bias, True, dts, order, k, row, cd0)
                    _gather(u, bi, c0, width, t0, span, bias, False, us, order, k, bi, cu0)
                    if softplus:
                        for i in range(per_step):
                            dts[i] = _softplus(dts[i])
                    for i in range(per_step):
                        ins[i] = dts[i] * us[i]
                    steps = all_steps[t0 : t0 + _BWD_CHUNK]
                    inputs = all_inputs[t0 : t0 + _BWD_CHUNK]
                    _to_rows(dts, steps, fused)
                    _to_rows(ins, inputs, fused)
                    for s in range(span):
                        B_t = Bt_k[order[k, t0 + s] if fused else t0 + s]
                        dt_s = steps[s]
                        in_s = inputs[s]
                        for n in range(n_state):
                            b_n = B_t[n]
                            h_n = h[n]
                            a_n = A2[n]
                            for j in range(lanes):
                                h_n[j] = _exp2(dt_s[j] * a_n[j]) * h_n[j] + in_s[j] * b_n
                # backward, chunk by chunk from the last
                carry[:] = _ZERO
                f64[:] = 0.0
                gates[:] = _ONE
                for ci in range(chunks - 1, -1, -1):
                    t0 = ci * _BWD_CHUNK
                    span = min(_BWD_CHUNK, length - t0)
                    steps = all_steps[t0 : t0 + _BWD_CHUNK]
                    inputs = all_inputs[t0 : t0 + _BWD_CHUNK]
                    _gather(dout, bi, c0, width, t0, span, bias, False, dycol, order, k, bi, cy0)
                    _to_rows(dycol, dys, fused)
                    _copy(ckpt[ci], states[0])
                    for s in range(span):
                        B_t = Bt_k[order[k, t0 + s] if fused else t0 + s]
                        dt_s = steps[s]
                        in_s = inputs[s]
                        for n in range(n_state):
                            b_n = B_t[n]
                            a_n = A2[n]
                            prev = states[s, n]
                            cur = states[s + 1, n]
                            dec = decay[s, n]
                            for j in range(lanes):
                                a = _exp2(dt_s[j] * a_n[j])
                                dec[j] = a
                                cur[j] = a * prev[j] + in_s[j] * b_n
                    _rows_dot(states[1:], dys, span, dCt[bi, k, t0:])
                    dA_chunk[:] = _ZERO
                    ddts[:] = _ZERO
                    dbus[:] = _ZERO
                    for s in range(span - 1, -1, -1):
                        B_t = Bt_k[order[k, t0 + s] if fused else t0 + s]
                        C_t = Ct_k[order[k, t0 + s] if fused else t0 + s]
                        dt_s = steps[s]
                        dy_s = dys[s]
                        ddt_s = ddts[s]
                        dbu_s = dbus[s]
                        for n in range(n_state):
                            b_n = B_t[n]
                            c_n = C_t[n]
                            g_n = carry[n]
                            dA_n = dA_chunk[n]
                            A_n = A_blk[n]
                            prev = states[s, n]
                            dec = decay[s, n]
                            for j in range(lanes):
                                g = dy_s[j] * c_n + g_n[j]
                                a = dec[j]
                                g_decay = g * a * prev[j]
                                dA_n[j] += g_decay * dt_s[j]
                                ddt_s[j] += g_decay * A_n[j]
                                dbu_s[j] += g * b_n
                                g_n[j] = a * g
                                dec[j] = g  # the decay is used up: keep g for the B grads
                    _rows_dot(decay, inputs, span, dBt[bi, k, t0:])
                    for n in range(n_state):
                        acc = dA_acc[n]
                        part = dA_chunk[n]
                        for j in range(lanes):
                            acc[j] += part[j]
                    # per (step, channel): du, ddelta (through the softplus gate), dD, dbias
                    _to_cols(ddts, ddtcol, fused)
                    _to_cols(dbus, dbucol, fused)
                    _to_cols(steps, dts, fused)
                    _gather(u, bi, c0, width, t0, span, bias, False, us, order, k, bi, cu0)
                    if softplus:  # d softplus(x) / dx = e / (1 + e), e = exp(x)
                        _gather(delta, bi, c0, width, t0, span, bias, True, gates, order, k, row, cd0)
                        for i in range(per_step):
                            x = gates[i]
                            e = _exp(x)
                            gates[i] = _ONE if x > _SOFTPLUS_THRESHOLD else e / (_ONE + e)
                    for i in range(per_step):
                        dy = dycol[i]
                        ut = us[i]
                        dbu = dbucol[i]
                        draw = (ddtcol[i] + dbu * ut) * gates[i]
                        ddtcol[i] = draw
                        dbucol[i] = dbu * dts[i] + dcol[i] * dy
                        dD_acc[i] += dy * ut
                        dbias_acc[i] += draw
                    _scatter(dbucol, bi, c0, width, t0, span, du, order, k, row, cd0)
                    _scatter(ddtcol, bi, c0, width, t0, span, ddelta, order, k, row, cd0)
                for j in range(width):
                    c = c0 + j
                    for n in range(n_state):
                        dA[bi, c, n] = dA_acc[n, j]
                    total_d = 0.0
                    total_bias = 0.0
                    for s in range(_BWD_CHUNK):
                        i = s * lanes + j if fused else j * _BWD_CHUNK + s
                        total_d += dD_acc[i]
                        total_bias += dbias_acc[i]
                    dD[bi, c] = total_d
                    dbias[bi, c] = total_bias


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


_executor: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its number of workers


def _forget_executor() -> None:
    """A forked child has none of its parent's threads: it starts a pool of its own."""
    global _executor
    _executor = None


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forget_executor)


def _run_tasks(kernel, args: tuple, tasks: int, scratch: tuple[int, int]) -> None:
    """Run ``kernel(*args, f32, f64, first, step)`` (a Numba function without the GIL) for
    every task on as many threads as the kernels use, each thread taking the next task when
    it is free and passing its own scratch arrays of ``scratch`` (float32, float64) elements.

    Python threads rather than a ``prange`` loop: Numba compiled the backward inside a
    parallel loop in half a minute, against a few seconds on its own; and a thread that
    another process holds up does not keep a fixed share of the tasks. Each task writes its own
    outputs, so the result does not depend on the number of threads or the order.
    """
    global _executor
    threads = max(1, min(numba.get_num_threads(), tasks))
    items = iter(range(tasks))
    lock = threading.Lock()

    def work() -> None:
        f32 = np.empty(scratch[0], dtype=np.float32)
        f64 = np.empty(scratch[1], dtype=np.float64)
        while True:
            with lock:
                item = next(items, None)
            if item is None:
                return
            kernel(*args, f32, f64, item, tasks)

    if threads == 1:
        work()
        return
    if _executor is None or _executor[1] < threads - 1:
        if _executor is not None:
            _executor[0].shutdown(wait=False)
        pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="selective_scan_cpu")
        _executor = (pool, threads - 1)
    futures = [_executor[0].submit(work) for _ in range(threads - 1)]
    work()
    for future in futures:
        future.result()


def backward_scratch_bytes(length: int, n_state: int) -> int:
    """Bytes of scratch memory one backward thread allocates for sequences of ``length`` steps.

    The backward sizes its scratch with the same function, so this is all it allocates besides
    the gradients: per thread, whatever the batch and the number of channels,
    ``(2 + n_state / 64) * 64`` floats per step (delta' and delta' u of 64 lanes, and the
    states every 64 steps) plus the buffers of one chunk (0.8 MB for 16 states).
    """
    if not NUMBA_AVAILABLE:
        raise ValueError("selective-scan backend 'cpu' needs numba (pip install numba)")
    f32, f64 = _backward_scratch_sizes(length, n_state, _BWD_LANES)
    return 4 * f32 + 8 * f64


def _sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ... in this order (a reduction that does not depend on threads)."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


def _arrays(u, delta, A, B, C, D, delta_bias):
    """Contiguous fp32 tensors for the kernels (no copy when already so); B, C as [b, K, L, N]."""
    channels = A.shape[0]

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


_NO_ORDER = np.zeros((0, 0), dtype=np.int32)


def _merge_directions(rows: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Direction-major ``[K, b, L, d]`` to the image's channels-last ``[b, L, d_x]``: the K
    directions summed in a fixed order, or (``grouped``) side by side as ``d_x = K*d`` channels."""
    if grouped:
        groups, b, length, d = rows.shape
        return rows.permute(1, 2, 0, 3).reshape(b, length, groups * d)
    return _sum_rows(rows)


def _run_backward(arrays: tuple, softplus: bool, dout, du, ddelta, order: np.ndarray) -> tuple:
    """Run the backward kernels on the kernel inputs ``arrays`` (:func:`_arrays`), writing the
    input gradients into ``du`` and ``ddelta`` (numpy views); returns dA, dD and dbias summed
    over the batch in a fixed order, and dBt, dCt ``[b, K, L, N]`` in scan order."""
    A, Bt, Ct = arrays[2], arrays[3], arrays[4]
    batch, groups, length, n_state = Bt.shape
    dA = torch.empty((batch, *A.shape), dtype=torch.float64)
    dBt = torch.zeros_like(Bt)
    dCt = torch.zeros_like(Ct)
    dD = torch.zeros((batch, A.shape[0]), dtype=torch.float64)
    dbias = torch.zeros_like(dD)
    _set_threads()
    args = (
        *(t.numpy() for t in arrays),
        softplus,
        dout,
        du,
        ddelta,
        *(t.numpy() for t in (dA, dBt, dCt, dD, dbias)),
        _BWD_LANES,
        order,
    )
    _run_tasks(_backward_tasks, args, batch * groups, _backward_scratch_sizes(length, n_state, _BWD_LANES))
    return _sum_rows(dA), _sum_rows(dD), _sum_rows(dbias), dBt, dCt


def _parameter_grads(sums: tuple, A, D, delta_bias) -> tuple:
    """The A, D and delta-bias gradients from :func:`_run_backward`'s sums, in their dtypes."""
    dA, dD, dbias = sums[:3]
    return (
        dA.to(A.dtype),
        None if D is None else dD.to(D.dtype),
        None if delta_bias is None else dbias.to(delta_bias.dtype),
    )


class SelectiveScanCPU(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs; backward recomputes the states in the kernels."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        arrays = _arrays(u, delta, A, B, C, D, delta_bias)
        out = torch.empty(u.shape, dtype=torch.float32)
        _set_threads()
        _forward_kernel(*(t.numpy() for t in arrays), delta_softplus, out.numpy(), _LANES, _NO_ORDER)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        arrays = _arrays(u, delta, A, B, C, D, delta_bias)
        du = torch.empty_like(arrays[0])
        ddelta = torch.empty_like(du)
        dout = grad_out.to(torch.float32).contiguous().numpy()
        sums = _run_backward(arrays, ctx.delta_softplus, dout, du.numpy(), ddelta.numpy(), _NO_ORDER)
        dBt, dCt = sums[3:]
        dA, dD, dbias = _parameter_grads(sums, A, D, delta_bias)
        grads = (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA,
            dBt.transpose(-1, -2).to(B.dtype),
            dCt.transpose(-1, -2).to(C.dtype),
            dD,
            dbias,
        )
        need = ctx.needs_input_grad
        return (*(g if wanted else None for g, wanted in zip(grads, need)), None)


def _cross_arrays(x, delta, A, B, C, D, delta_bias, perms) -> tuple[tuple, np.ndarray]:
    """The kernel inputs of a channels-last cross-scan (delta as ``[K*b, L, d]`` rows, B and C
    as ``[b, K, L, N]``) and the scan orders as int32."""
    groups, b, length, d = delta.shape
    arrays = _arrays(
        x,
        delta.reshape(groups * b, length, d),
        A,
        B.permute(0, 2, 3, 1),
        C.permute(0, 2, 3, 1),
        D,
        delta_bias,
    )
    return arrays, perms.to(torch.int32).contiguous().numpy()


class CrossScanCPU(torch.autograd.Function):
    """Autograd wrapper of the fused cross-scan (:func:`cross_scan_cpu_channels_last`); saves
    only the inputs."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, delta_bias, perms, delta_softplus, grouped):
        ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, perms)
        ctx.delta_softplus, ctx.grouped = delta_softplus, grouped
        groups, b, length, d = delta.shape
        arrays, order = _cross_arrays(x, delta, A, B, C, D, delta_bias, perms)
        out = torch.empty((groups, b, length, d), dtype=torch.float32)
        _set_threads()
        _forward_kernel(
            *(t.numpy() for t in arrays), delta_softplus, out.view(-1, length, d).numpy(), _LANES, order
        )
        return _merge_directions(out, grouped)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, delta, A, B, C, D, delta_bias, perms = ctx.saved_tensors
        groups, b, length, d = delta.shape
        arrays, order = _cross_arrays(x, delta, A, B, C, D, delta_bias, perms)
        du = torch.empty((groups, b, length, d), dtype=torch.float32)
        ddelta = torch.empty_like(du)
        dout = grad_out.to(torch.float32).contiguous().numpy()
        rows = (du.view(-1, length, d).numpy(), ddelta.view(-1, length, d).numpy())
        sums = _run_backward(arrays, ctx.delta_softplus, dout, *rows, order)
        dBt, dCt = sums[3:]  # in scan order
        dA, dD, dbias = _parameter_grads(sums, A, D, delta_bias)
        inverse = torch.argsort(perms.to(torch.int64), dim=1)
        index = inverse.view(1, groups, length, 1).expand(b, groups, length, A.shape[1])

        def to_pixels(scan_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return torch.gather(scan_rows, 2, index).transpose(1, 2).to(like.dtype)

        grads = (
            _merge_directions(du, ctx.grouped).to(x.dtype),
            ddelta.to(delta.dtype),
            dA,
            to_pixels(dBt, B),
            to_pixels(dCt, C),
            dD,
            dbias,
        )
        need = ctx.needs_input_grad
        return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None, None)


def cross_scan_cpu_channels_last(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    perms: torch.Tensor,
    delta_softplus: bool = False,
    grouped: bool = False,
) -> torch.Tensor:
    """:func:`cross_scan_cpu` on channels-last tensors, the kernels' own layout: ``x [b, L,
    d_x]``, ``delta [K, b, L, d]`` (direction-major), ``B, C [b, L, K, N]``, all in pixel order;
    returns ``[b, L, d_x]``.

    A step of direction k reads the block's channels of pixel ``perms[k, t]`` in one run, and
    SS2D computes its projections in these layouts with (batched) matrix products, so nothing
    large is transposed on the way in or out. The shapes are checked on pixel-order views.
    """
    if not NUMBA_AVAILABLE:
        raise ValueError("selective-scan backend 'cpu' needs numba (pip install numba)")
    from model.ops.selective_scan import check_cross_scan_args

    views = (x.transpose(1, 2), delta.permute(1, 0, 3, 2), A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1))
    check_cross_scan_args(*views, D, delta_bias, perms, grouped)
    args = (x, delta, A, B, C, D, delta_bias, perms.to(x.device))
    return CrossScanCPU.apply(*args, bool(delta_softplus), bool(grouped))


def cross_scan_cpu(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    perms: torch.Tensor,
    delta_softplus: bool = False,
    grouped: bool = False,
) -> torch.Tensor:
    """SS2D's K-direction scan in one call on CPU tensors, every tensor in pixel order.

    Same arguments and result as :func:`model.ops.selective_scan_triton.cross_scan_triton`
    (checked by :func:`model.ops.selective_scan.check_cross_scan_args`): the kernels read each
    direction's steps through ``perms``, so no ``[b, K, d, L]`` copy of ``x`` in scan order is
    made, nor the outputs and gradients scattered back. Runs
    :func:`cross_scan_cpu_channels_last` after transposing; SS2D calls that one directly.
    """
    from model.ops.selective_scan import check_cross_scan_args

    check_cross_scan_args(x, delta, A, B, C, D, delta_bias, perms, grouped)
    y = cross_scan_cpu_channels_last(
        x.transpose(1, 2),
        delta.permute(1, 0, 3, 2),
        A,
        B.permute(0, 3, 1, 2),
        C.permute(0, 3, 1, 2),
        D,
        delta_bias,
        perms,
        delta_softplus,
        grouped,
    )
    return y.transpose(1, 2)


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
