# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""Triton selective scan for NVIDIA GPUs (backend ``triton``), forward and backward.

Same semantics and shapes as :func:`model.ops.selective_scan.selective_scan_fn`. One program
per (batch, block of channels) runs the time loop with the ``N`` states of its channels in
registers; forward keeps only the current state. Backward stores the state at chunk
boundaries, then walks the chunks in reverse, recomputing the chunk's states into a small
scratch buffer. B/C gradients are written per channel and summed over the ``d`` channels of a
group in PyTorch, so no atomics are needed. Accumulation is fp32; the output is fp32 and the
gradients take the input dtypes.

Triton is optional: without it this module imports, :data:`TRITON_AVAILABLE` is False and
:func:`selective_scan_triton` raises ``ValueError``. With ``TRITON_INTERPRET=1`` set before
triton is imported, the kernels run on CPU tensors (slowly; used by the tests).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK_D = 32
CHUNK = 64
_MAX_ELEMENTS = 2**31 - 1

if TRITON_AVAILABLE:

    @triton.jit
    def _softplus(x):
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

    @triton.jit
    def _fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr,
        channels, d, K, N, L,
        SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr, N_PAD: tl.constexpr,
    ):  # fmt: skip
        bi = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, N_PAD)
        mask_c = offs_c < channels
        mask_cn = mask_c[:, None] & (offs_n[None, :] < N)
        k = offs_c // d
        A = tl.load(A_ptr + offs_c[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0)
        Dv = tl.load(D_ptr + offs_c, mask=mask_c, other=0.0)
        bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)
        row = (bi * channels + offs_c) * L
        bc_row = ((bi * K + k)[:, None] * N + offs_n[None, :]) * L
        h = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        for t in range(0, L):
            u = tl.load(u_ptr + row + t, mask=mask_c, other=0.0)
            dt = tl.load(dt_ptr + row + t, mask=mask_c, other=0.0) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_cn, other=0.0)
            Ct = tl.load(C_ptr + bc_row + t, mask=mask_cn, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt
            y = tl.sum(Ct * h, axis=1) + Dv * u
            tl.store(y_ptr + row + t, y, mask=mask_c)

    @triton.jit
    def _bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, gy_ptr,
        ckpt_ptr, scratch_ptr,
        du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        channels, d, K, N, L, n_chunks,
        SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr, N_PAD: tl.constexpr, CH: tl.constexpr,
    ):  # fmt: skip
        bi = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, N_PAD)
        mask_c = offs_c < channels
        mask_cn = mask_c[:, None] & (offs_n[None, :] < N)
        k = offs_c // d
        A = tl.load(A_ptr + offs_c[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0)
        Dv = tl.load(D_ptr + offs_c, mask=mask_c, other=0.0)
        bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)
        row = (bi * channels + offs_c) * L
        bc_row = ((bi * K + k)[:, None] * N + offs_n[None, :]) * L
        # per-channel state buffers: [b, channels, n_chunks | CH, N_PAD]
        state_cn = (bi * channels + offs_c)[:, None] * N_PAD + offs_n[None, :]
        ckpt_base = ckpt_ptr + state_cn * n_chunks
        scratch_base = scratch_ptr + state_cn * CH
        part_cn = (bi * channels + offs_c)[:, None] * N + offs_n[None, :]

        # pass 1: the state before each chunk
        h = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        for j in range(0, n_chunks):
            tl.store(ckpt_base + j, h, mask=mask_cn)
            for t in range(j * CH, tl.minimum(j * CH + CH, L)):
                u = tl.load(u_ptr + row + t, mask=mask_c, other=0.0)
                dt = tl.load(dt_ptr + row + t, mask=mask_c, other=0.0) + bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                Bt = tl.load(B_ptr + bc_row + t, mask=mask_cn, other=0.0)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt

        # pass 2: chunks in reverse; recompute h_{t-1} into scratch, then step back in time
        dh = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for jj in range(0, n_chunks):
            j = n_chunks - 1 - jj
            t0 = j * CH
            t1 = tl.minimum(t0 + CH, L)
            h = tl.load(ckpt_base + j, mask=mask_cn, other=0.0)
            for t in range(t0, t1):
                tl.store(scratch_base + (t - t0), h, mask=mask_cn)
                u = tl.load(u_ptr + row + t, mask=mask_c, other=0.0)
                dt = tl.load(dt_ptr + row + t, mask=mask_c, other=0.0) + bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                Bt = tl.load(B_ptr + bc_row + t, mask=mask_cn, other=0.0)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt
            for i in range(0, t1 - t0):
                t = t1 - 1 - i
                h_prev = tl.load(scratch_base + (t - t0), mask=mask_cn, other=0.0)
                u = tl.load(u_ptr + row + t, mask=mask_c, other=0.0)
                raw = tl.load(dt_ptr + row + t, mask=mask_c, other=0.0) + bias
                dt = raw
                if SOFTPLUS:
                    dt = _softplus(raw)
                Bt = tl.load(B_ptr + bc_row + t, mask=mask_cn, other=0.0)
                Ct = tl.load(C_ptr + bc_row + t, mask=mask_cn, other=0.0)
                gy = tl.load(gy_ptr + row + t, mask=mask_c, other=0.0)
                dA_t = tl.exp(dt[:, None] * A)
                h_t = dA_t * h_prev + (dt * u)[:, None] * Bt
                tl.store(dC_ptr + part_cn * L + t, gy[:, None] * h_t, mask=mask_cn)
                dh = dh + gy[:, None] * Ct
                tl.store(dB_ptr + part_cn * L + t, dh * (dt * u)[:, None], mask=mask_cn)
                dt_h = dh * dA_t * h_prev
                dA_acc += dt_h * dt[:, None]
                g_dt = tl.sum(dt_h * A + dh * Bt * u[:, None], axis=1)
                if SOFTPLUS:
                    g_dt = g_dt / (1.0 + tl.exp(-raw))
                tl.store(ddt_ptr + row + t, g_dt, mask=mask_c)
                dbias_acc += g_dt
                g_u = tl.sum(dh * Bt, axis=1) * dt + gy * Dv
                tl.store(du_ptr + row + t, g_u, mask=mask_c)
                dD_acc += gy * u
                dh = dh * dA_t
        tl.store(dA_ptr + part_cn, dA_acc, mask=mask_cn)
        tl.store(dD_ptr + bi * channels + offs_c, dD_acc, mask=mask_c)
        tl.store(dbias_ptr + bi * channels + offs_c, dbias_acc, mask=mask_c)


def _launch_args(u: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> tuple:
    b, channels, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    # smaller channel blocks when there are few (batch, channel) rows, so that the grid still
    # fills the GPU: the time loop is sequential inside each program.
    block = max(4, min(BLOCK_D, triton.next_power_of_2(max(1, b * channels // 1024))))
    block = min(block, triton.next_power_of_2(channels))
    grid = (b, triton.cdiv(channels, block))
    return b, channels, length, groups, n, block, grid, triton.next_power_of_2(n)


class _SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: saves only the (fp32, contiguous) inputs; backward recomputes states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, delta_bias)]
        f32 = [x.float().contiguous() for x in (u, delta, A, B, C)]
        zeros = torch.zeros(u.shape[1], device=u.device)
        Df = zeros if D is None else D.float().contiguous()
        bf = zeros if delta_bias is None else delta_bias.float().contiguous()
        b, channels, length, groups, n, block, grid, n_pad = _launch_args(u, B, A)
        y = torch.empty(b, channels, length, device=u.device, dtype=torch.float32)
        _fwd_kernel[grid](
            *f32, Df, bf, y, channels, channels // groups, groups, n, length,
            SOFTPLUS=bool(delta_softplus), BLOCK=block, N_PAD=n_pad,
        )  # fmt: skip
        ctx.save_for_backward(*f32, Df, bf)
        ctx.dtypes = dtypes
        ctx.softplus = bool(delta_softplus)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        u, delta, A, B, C, Df, bf = ctx.saved_tensors
        b, channels, length, groups, n, block, grid, n_pad = _launch_args(u, B, A)
        d = channels // groups
        chunk = min(CHUNK, max(1, triton.next_power_of_2(length)))
        n_chunks = triton.cdiv(length, chunk)
        dev = u.device
        ckpt = torch.empty(b, channels, n_pad, n_chunks, device=dev)
        scratch = torch.empty(b, channels, n_pad, chunk, device=dev)
        du = torch.empty_like(u)
        ddt = torch.empty_like(delta)
        dA = torch.empty(b, channels, n, device=dev)
        dB = torch.empty(b, channels, n, length, device=dev)
        dC = torch.empty(b, channels, n, length, device=dev)
        dD = torch.empty(b, channels, device=dev)
        dbias = torch.empty(b, channels, device=dev)
        _bwd_kernel[grid](
            u, delta, A, B, C, Df, bf, grad_y.float().contiguous(), ckpt, scratch,
            du, ddt, dA, dB, dC, dD, dbias, channels, d, groups, n, length, n_chunks,
            SOFTPLUS=ctx.softplus, BLOCK=block, N_PAD=n_pad, CH=chunk,
        )  # fmt: skip
        grads = [
            du,
            ddt,
            dA.sum(0),
            dB.view(b, groups, d, n, length).sum(2),
            dC.view(b, groups, d, n, length).sum(2),
            dD.sum(0),
            dbias.sum(0),
        ]
        out = [None if dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*out, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan with the Triton kernels; CUDA tensors (or CPU ones under the interpreter).

    Raises ``ValueError`` when triton is missing. The arguments are checked by
    :func:`model.ops.selective_scan.selective_scan_fn` (call it with ``backend="triton"``), not here.
    """
    if not TRITON_AVAILABLE:
        raise ValueError("backend 'triton' needs triton (pip install triton)")
    _, channels, length = u.shape
    # per-channel B/C gradient buffers [b, K*d, N, L] are indexed with int32 offsets
    per_sample = channels * A.shape[1] * length
    if u.shape[0] > 1 and u.shape[0] * per_sample >= _MAX_ELEMENTS:
        step = max(1, _MAX_ELEMENTS // per_sample)
        rows = [slice(i, i + step) for i in range(0, u.shape[0], step)]
        parts = [
            _SelectiveScanTriton.apply(u[r], delta[r], A, B[r], C[r], D, delta_bias, delta_softplus)
            for r in rows
        ]
        return torch.cat(parts)
    if per_sample >= _MAX_ELEMENTS:
        raise ValueError(f"selective scan too large for the triton backend: {per_sample} states per sample")
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
