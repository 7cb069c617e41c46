"""Float32 arithmetic for the Numba scan kernels (:mod:`model.ops.cpu_kernels`): Numba itself,
the kernels' compilation settings and exp, 2**x, log and softplus.

Every transcendental function in the kernels' loops is written here with arithmetic and selects
only, so that LLVM vectorises it: Numba has no vector exp without Intel SVML, and a scalar libm
call costs more than the whole state update. Numba is optional: without it this module still
imports and :data:`NUMBA_AVAILABLE` is False.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:
    numba = None

NUMBA_AVAILABLE = numba is not None

# torch.nn.functional.softplus switches to the identity above this input (beta = 1).
SOFTPLUS_THRESHOLD = np.float32(20.0)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)

# exp for float32 (Cephes expf: range reduction by ln 2 and a degree-7 polynomial, a few ulp).
LOG2E = np.float32(1.4426950408889634)
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

if NUMBA_AVAILABLE:
    # error_model="numpy": no zero-division check (a branch) in float divisions, which kept
    # LLVM from vectorising the softplus loops; no division here can have a zero divisor.
    jit_parallel = numba.njit(parallel=True, fastmath={"contract"}, error_model="numpy", cache=True)
    jit_inline = numba.njit(fastmath={"contract"}, error_model="numpy", cache=True, inline="always")
    jit_nogil = numba.njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
    jit_reduce = numba.njit(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)

    @jit_inline
    def exp32(x):
        """exp(x) in float32 from arithmetic and selects only, so loops over it vectorise."""
        xc = min(max(x, _EXP_MIN), _EXP_MAX)
        k = np.floor(xc * LOG2E + _HALF)
        r = xc - k * _LN2_HI - k * _LN2_LO
        p0, p1, p2, p3, p4 = _EXP_POLY
        p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + _HALF
        p = p * (r * r) + r + ONE
        # 2**k as two exact power-of-two factors, so that k = -126 and k = 128 stay in range.
        ki = np.int32(k)
        k1 = ki >> 1
        res = (
            p * np.int32((k1 + 127) << 23).view(np.float32) * np.int32((ki - k1 + 127) << 23).view(np.float32)
        )
        res = ZERO if x < _EXP_MIN else res
        res = _INF if x > _EXP_MAX else res
        return x if x != x else res

    @jit_inline
    def exp2_32(z):
        """2**z in float32 (about 1 ulp) for the hot loops: 2**-126 for anything smaller, inf above 128.

        The decay a multiplies a state that is at most a few orders of magnitude large, so the
        difference between 2**-126 and 0 never reaches an fp32 output (with denormals flushed).
        """
        zc = min(max(z, _EXP2_MIN), _EXP2_MAX)
        t = zc + _ROUND
        r = zc - (t - _ROUND)
        e0, e1, e2, e3, e4, e5 = _EXP2_POLY
        p = (((((e0 * r + e1) * r + e2) * r + e3) * r + e4) * r + e5) * r + ONE
        return np.int32(np.float32(p).view(np.int32) + (np.float32(t).view(np.int32) << 23)).view(np.float32)

    @jit_inline
    def log32(x):
        """log(x) in float32 for finite x >= 1 (Cephes logf), from arithmetic and selects only."""
        bits = np.float32(x).view(np.int32)
        e = np.float32((bits >> 23) - 127)
        m = np.int32((bits & 0x7FFFFF) | 0x3F800000).view(np.float32)
        big = m > _SQRT2
        m = m * _HALF if big else m
        e = e + ONE if big else e
        f = m - ONE
        z = f * f
        q0, q1, q2, q3, q4, q5, q6, q7, q8 = _LOG_POLY
        y = ((((((((q0 * f + q1) * f + q2) * f + q3) * f + q4) * f + q5) * f + q6) * f + q7) * f + q8) * f * z
        y = y + e * _LN2_LO - _HALF * z
        return f + y + e * _LN2_HI

    @jit_inline
    def softplus32(raw):
        """torch's softplus log1p(exp(raw)) (identity above the threshold), NaN kept."""
        e = exp32(raw)
        up = ONE + e
        res = log32(up) - ((up - ONE) - e) / up
        return raw if (raw > SOFTPLUS_THRESHOLD or raw != raw) else res
