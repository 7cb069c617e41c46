# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""CPU selective scan: Numba kernels for the forward and backward pass (backend ``cpu``).

Same semantics and shapes as :func:`model.ops.selective_scan.selective_scan_fn`. The
PyTorch backends spend their time in thousands of small tensor ops and keep every state
``h_t`` for backward (``b*K*d*L*N`` floats); these kernels run one fused loop per
(batch, channel) instead. Forward keeps only the current state; backward recomputes the
states of one channel at a time into a small scratch buffer (``L*N`` floats per thread) and
walks back through time, so the autograd graph holds nothing but the inputs.

Numba is optional: without it this module still imports, :data:`NUMBA_AVAILABLE` is False
and :func:`selective_scan_cpu` raises ``ValueError``. Kernels are compiled on first use
(``cache=True`` keeps the machine code in ``__pycache__`` for later processes).
"""

from __future__ import annotations

import math

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
# libm's scalar expf call costs ~4x more than the whole state update and blocks vectorisation
# over the N states (Numba has no vector exp without Intel SVML).
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

if NUMBA_AVAILABLE:
    _jit = numba.njit(parallel=True, fastmath=False, cache=True)
    _inline = numba.njit(fastmath=False, cache=True, inline="always")
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
    def _step_size(raw, softplus):
        """delta' and d delta' / d raw for one step, as torch's softplus computes them."""
        if not softplus or raw > _SOFTPLUS_THRESHOLD:
            return raw, _ONE
        return np.float32(math.log1p(math.exp(raw))), np.float32(_ONE / (_ONE + math.exp(-raw)))

    @_jit
    def _forward_kernel(u, delta, A, Bt, Ct, D, bias, softplus, out):
        """out[b, c, t] = y_t; parallel over (batch, channel), one running state per task."""
        batch, channels, length = u.shape
        n_state = A.shape[1]
        per_group = channels // Bt.shape[1]
        for item in prange(batch * channels):
            bi = item // channels
            c = item % channels
            k = c // per_group
            A_c = A[c]
            h = np.zeros(n_state, dtype=np.float32)
            for t in range(length):
                dt, _ = _step_size(delta[bi, c, t] + bias[c], softplus)
                ut = u[bi, c, t]
                dtu = dt * ut
                B_t = Bt[bi, k, t]
                C_t = Ct[bi, k, t]
                for n in range(n_state):
                    h[n] = _exp(dt * A_c[n]) * h[n] + dtu * B_t[n]
                y = _ZERO
                for n in range(n_state):
                    y += C_t[n] * h[n]
                out[bi, c, t] = y + D[c] * ut

    @_jit
    def _backward_kernel(u, delta, A, Bt, Ct, D, bias, softplus, dout, du, ddelta, dA, dBt, dCt, dD, dbias):
        """Gradients of sum(dout * y).

        Parallel over (batch, group): a task owns dBt/dCt[b, k] and loops over the group's
        channels, so the reduction of the B/C grads over channels needs no atomics. Per
        channel it recomputes and stores h_t and exp(delta'_t A) for all t, then runs the
        adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1} backwards. dA, dD and dbias get
        one row per batch element (the caller sums over b); they accumulate in float64.
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
            dA_acc = np.empty(n_state, dtype=np.float64)
            for j in range(per_group):
                c = k * per_group + j
                A_c = A[c]
                for t in range(length):
                    dt, gate = _step_size(delta[bi, c, t] + bias[c], softplus)
                    steps[t] = dt
                    gates[t] = gate
                    dtu = dt * u[bi, c, t]
                    B_t = Bt[bi, k, t]
                    a_t = decay[t]
                    h_prev = states[t]
                    h_t = states[t + 1]
                    for n in range(n_state):
                        a = _exp(dt * A_c[n])
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
                    ddt = _ZERO
                    dbu = _ZERO
                    for n in range(n_state):
                        g = dy * C_t[n] + carry[n]
                        a = a_t[n]
                        dC_t[n] += dy * h_t[n]
                        dB_t[n] += g * dtu
                        g_decay = g * h_prev[n] * a
                        dA_acc[n] += g_decay * dt
                        gb = g * B_t[n]
                        ddt += g_decay * A_c[n] + gb * ut
                        dbu += gb
                        carry[n] = a * g
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
        _forward_kernel(*(t.numpy() for t in arrays), delta_softplus, out.numpy())
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

    Raises ``ValueError`` when Numba is missing, for non-CPU tensors, or on mismatched shapes.
    """
    if not NUMBA_AVAILABLE:
        raise ValueError("selective-scan backend 'cpu' needs numba (pip install numba)")
    tensors = (u, delta, A, B, C, D, delta_bias)
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        raise ValueError("selective-scan backend 'cpu' takes CPU tensors only")
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    if groups == 0 or channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups of B/C")
    expected = {
        "delta": (delta, (batch, channels, length)),
        "A": (A, (channels, n_state)),
        "B": (B, (batch, groups, n_state, length)),
        "C": (C, (batch, groups, n_state, length)),
        "D": (D, (channels,)),
        "delta_bias": (delta_bias, (channels,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    return SelectiveScanCPU.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))
