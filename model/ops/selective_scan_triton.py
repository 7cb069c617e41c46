# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""Triton selective scan for NVIDIA GPUs (backend ``triton``), forward and backward, plain or fused
with SS2D's cross-scan.

:func:`selective_scan_triton` has the semantics and shapes of
:func:`model.ops.selective_scan.selective_scan_fn`. :func:`cross_scan_triton` fuses SS2D's
K-direction scan: inputs stay in pixel order and the kernels read pixel ``perms[k, t]`` at step
``t`` of direction ``k``, so neither the ``[b, K, d, L]`` gather of the input (``scan_encode``)
nor the un-permuting gather of the output (``scan_decode``) is materialised, forward or backward.

Both run the same two kernels. One program per (sample, direction, block of channels) runs the
time loop with the ``N`` states of its channels in registers; a channel block never straddles
two directions, so B and C are loaded once per step for the whole block. Forward keeps only the
current state. Backward stores the state at chunk boundaries (``~sqrt(L)`` steps apart), then
walks the chunks in reverse, recomputing each chunk's states into a scratch buffer.

Every gradient is deterministic (bit-identical from call to call): no atomics anywhere. Each
program writes only its own slots; the B/C gradients are summed over the block's channels inside
the kernel (``tl.sum``) into per-block partials ``[b, K, n_blocks, L, N]``, which PyTorch then
sums over the few blocks, as it sums ``A``/``D``/``delta_bias`` over the batch.

Summing over directions (non-grouped cross-scan). Each direction's output lands at different
pixels at every step, so one program looping over the K directions of its channel block would
have to read back and add to ``y`` in global memory, and its sequential time loop (what bounds a
scan on a GPU) would be K times longer on a grid K times smaller. Instead each direction writes
its own ``[b, K, d, L]`` slice in pixel order and PyTorch sums over K (a fixed-order, hence
deterministic, reduction); the same holds for ``du`` in backward. The cost is one transient fp32
``[b, K, d, L]`` buffer per call, freed right after the sum and never saved for backward, in
exchange for the full K-fold parallelism of the grid. The grouped variant needs no sum (direction
``k`` owns channels ``k*d .. k*d+d-1``). Not measured yet: chosen without a GPU.

Accumulation is fp32; the output is fp32 and the gradients take the input dtypes. Offsets are
int32: a call whose buffers would reach 2**31 elements is split over the batch.

Triton is optional: without it this module imports, :data:`TRITON_AVAILABLE` is False and the
entry points raise ``ValueError``. With ``TRITON_INTERPRET=1`` set before triton is imported, the
kernels run on CPU tensors (slowly; used by the tests).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from model.ops.scan_reference import check_cross_scan_args

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
DEFAULT_WARPS = 4
# Launch settings measured on a GPU by ``tools/gpu_check.py --only launch``: (kernel, groups, d,
# N, L) -> (channels per program, num_warps). Empty until a GPU session fills it from the check's
# ``launch.suggested_table``; until then every shape takes ``_block`` and ``DEFAULT_WARPS``.
LAUNCH_TABLE: dict[tuple[str, int, int, int, int], tuple[int, int]] = {}
_forced_launch: tuple[int | None, int | None] = (None, None)
# Offsets inside the kernels are int32: every buffer of one launch must stay below this many
# elements (the tests lower it to force the batch split).
_MAX_ELEMENTS = 2**31 - 1

if TRITON_AVAILABLE:

    @triton.jit
    def _log1p(z):
        """log(1 + z) for 0 <= z <= 1 to a few ulps, as 2 atanh(s), s = z / (2 + z) <= 1/3, by its
        odd series (8 terms: the rest is below 2**-26). tl.log is a fast approximation on GPUs
        whose absolute error would swamp log(1 + z) for small z."""
        s = z / (2.0 + z)
        s2 = s * s
        p = s2 * (1.0 / 15.0) + 1.0 / 13.0
        p = p * s2 + 1.0 / 11.0
        p = p * s2 + 1.0 / 9.0
        p = p * s2 + 1.0 / 7.0
        p = p * s2 + 1.0 / 5.0
        p = p * s2 + 1.0 / 3.0
        p = p * s2 + 1.0
        return 2.0 * s * p

    @triton.jit
    def _softplus(x):
        """torch's F.softplus (threshold 20) in fp32 at full relative precision for any x:
        max(x, 0) + log1p(exp(-|x|)), where log(1 + exp(x)) would round to 0 below x = -17."""
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))

    @triton.jit
    def _position(perm_ptr, k, L, t, PERM: tl.constexpr):
        """Pixel read at step ``t`` of direction ``k``: ``perms[k, t]``, or ``t`` without a table."""
        p = t
        if PERM:
            p = tl.load(perm_ptr + k * L + t)
        return p

    @triton.jit
    def _inputs_at(u_ptr, dt_ptr, B_ptr, u_row, row, bc, p, bias, mask_c, mask_n, SOFTPLUS: tl.constexpr):
        """u, raw delta (+ bias), delta (after softplus) of the block's channels and B at pixel p."""
        u = tl.load(u_ptr + u_row + p, mask=mask_c, other=0.0)
        raw = tl.load(dt_ptr + row + p, mask=mask_c, other=0.0) + bias
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        Bt = tl.load(B_ptr + bc + p, mask=mask_n, other=0.0)
        return u, raw, dt, Bt

    @triton.jit
    def _fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, perm_ptr, y_ptr,
        u_bs, u_ks, d, K, N, L,
        PERM: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr, N_PAD: tl.constexpr,
    ):  # fmt: skip
        # program (sample bi, direction k, block of its d channels); u rows are
        # bi * u_bs + k * u_ks + c, delta and y rows [b, K, d] (all strided by L)
        bi = tl.program_id(0)
        k = tl.program_id(1)
        offs_c = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, N_PAD)
        mask_c = offs_c < d
        mask_n = offs_n < N
        mask_cn = mask_c[:, None] & mask_n[None, :]
        ch = k * d + offs_c
        A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0)
        Dv = tl.load(D_ptr + ch, mask=mask_c, other=0.0)
        bias = tl.load(bias_ptr + ch, mask=mask_c, other=0.0)
        u_row = (bi * u_bs + k * u_ks + offs_c) * L
        row = (bi * K * d + ch) * L
        bc = ((bi * K + k) * N + offs_n) * L
        h = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        for t in range(0, L):
            p = _position(perm_ptr, k, L, t, PERM)
            u, _, dt, Bt = _inputs_at(u_ptr, dt_ptr, B_ptr, u_row, row, bc, p, bias, mask_c, mask_n, SOFTPLUS)
            Ct = tl.load(C_ptr + bc + p, mask=mask_n, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            tl.store(y_ptr + row + p, y, mask=mask_c)

    @triton.jit
    def _bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, perm_ptr, gy_ptr,
        ckpt_ptr, scratch_ptr,
        du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        u_bs, u_ks, d, K, N, L, n_chunks,
        PERM: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr, N_PAD: tl.constexpr,
        CH: tl.constexpr,
    ):  # fmt: skip
        # Same programs as forward. grad_y and u share their row layout; du and ddelta are written
        # [b, K, d, L], dB/dC as this block's partial sums [b, K, n_blocks, L, N].
        #
        # The checkpoints and the scratch states go through global memory, and on a GPU the
        # thread that reads a state back need not be the one that wrote it (Triton spreads
        # [BLOCK, N_PAD] over the threads as it likes, and stores only one copy of data that
        # several threads hold). tl.debug_barrier() (bar.sync: all of the program's threads wait,
        # and their earlier global writes become visible to each other) therefore separates
        # every write of these buffers from the reads of it, and the reads of one chunk from
        # the next chunk's writes to the same scratch slots. The interpreter runs a program as
        # one thread, where the barriers are no-ops.
        bi = tl.program_id(0)
        k = tl.program_id(1)
        cb = tl.program_id(2)
        n_blocks = tl.num_programs(2)
        offs_c = cb * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, N_PAD)
        mask_c = offs_c < d
        mask_n = offs_n < N
        mask_cn = mask_c[:, None] & mask_n[None, :]
        ch = k * d + offs_c
        A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0)
        Dv = tl.load(D_ptr + ch, mask=mask_c, other=0.0)
        bias = tl.load(bias_ptr + ch, mask=mask_c, other=0.0)
        u_row = (bi * u_bs + k * u_ks + offs_c) * L
        row = (bi * K * d + ch) * L
        bc = ((bi * K + k) * N + offs_n) * L
        # states [b, K*d, n_chunks | CH, N_PAD], the state index innermost
        state_row = (bi * K * d + ch)[:, None]
        ckpt_base = ckpt_ptr + state_row * (n_chunks * N_PAD) + offs_n[None, :]
        scratch_base = scratch_ptr + state_row * (CH * N_PAD) + offs_n[None, :]
        part = ((bi * K + k) * n_blocks + cb) * L * N + offs_n

        # pass 1: the state before each chunk
        h = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        for j in range(0, n_chunks):
            tl.store(ckpt_base + j * N_PAD, h, mask=mask_cn)
            for t in range(j * CH, tl.minimum(j * CH + CH, L)):
                p = _position(perm_ptr, k, L, t, PERM)
                u, _, dt, Bt = _inputs_at(
                    u_ptr, dt_ptr, B_ptr, u_row, row, bc, p, bias, mask_c, mask_n, SOFTPLUS
                )
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        tl.debug_barrier()  # checkpoints written above, read below

        # pass 2: chunks in reverse; recompute h_{t-1} into scratch, then step back in time
        dh = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK, N_PAD], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for jj in range(0, n_chunks):
            j = n_chunks - 1 - jj
            t0 = j * CH
            t1 = tl.minimum(t0 + CH, L)
            h = tl.load(ckpt_base + j * N_PAD, mask=mask_cn, other=0.0)
            for t in range(t0, t1):
                tl.store(scratch_base + (t - t0) * N_PAD, h, mask=mask_cn)
                p = _position(perm_ptr, k, L, t, PERM)
                u, _, dt, Bt = _inputs_at(
                    u_ptr, dt_ptr, B_ptr, u_row, row, bc, p, bias, mask_c, mask_n, SOFTPLUS
                )
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.debug_barrier()  # scratch written above, read below
            for i in range(0, t1 - t0):
                t = t1 - 1 - i
                h_prev = tl.load(scratch_base + (t - t0) * N_PAD, mask=mask_cn, other=0.0)
                p = _position(perm_ptr, k, L, t, PERM)
                u, raw, dt, Bt = _inputs_at(
                    u_ptr, dt_ptr, B_ptr, u_row, row, bc, p, bias, mask_c, mask_n, SOFTPLUS
                )
                Ct = tl.load(C_ptr + bc + p, mask=mask_n, other=0.0)
                gy = tl.load(gy_ptr + u_row + p, mask=mask_c, other=0.0)
                dA_t = tl.exp(dt[:, None] * A)
                dtu = dt * u
                h_t = dA_t * h_prev + dtu[:, None] * Bt[None, :]
                tl.store(dC_ptr + part + p * N, tl.sum(gy[:, None] * h_t, axis=0), mask=mask_n)
                dh = dh + gy[:, None] * Ct[None, :]
                tl.store(dB_ptr + part + p * N, tl.sum(dh * dtu[:, None], axis=0), mask=mask_n)
                dt_h = dh * dA_t * h_prev
                dA_acc += dt_h * dt[:, None]
                g_dt = tl.sum(dt_h * A + dh * Bt[None, :] * u[:, None], axis=1)
                if SOFTPLUS:
                    g_dt = tl.where(raw > 20.0, g_dt, g_dt / (1.0 + tl.exp(-raw)))
                tl.store(ddt_ptr + row + p, g_dt, mask=mask_c)
                dbias_acc += g_dt
                g_u = tl.sum(dh * Bt[None, :], axis=1) * dt + gy * Dv
                tl.store(du_ptr + row + p, g_u, mask=mask_c)
                dD_acc += gy * u
                dh = dh * dA_t
            tl.debug_barrier()  # this chunk's scratch reads done before the next chunk overwrites it
        tl.store(dA_ptr + (bi * K * d + ch)[:, None] * N + offs_n[None, :], dA_acc, mask=mask_cn)
        tl.store(dD_ptr + bi * K * d + ch, dD_acc, mask=mask_c)
        tl.store(dbias_ptr + bi * K * d + ch, dbias_acc, mask=mask_c)


def _block(groups: int, d: int) -> int:
    """Default channels per program, from the scan's shape alone (never the batch, so a run compiles
    each kernel once per image size): about 512 programs per sample, 4 to ``BLOCK_D`` channels."""
    block = max(4, min(BLOCK_D, triton.next_power_of_2(max(1, groups * d // 512))))
    return min(block, triton.next_power_of_2(d))


def launch_settings(kernel: str, groups: int, d: int, n: int, length: int) -> tuple[int, int]:
    """``(channels per program, num_warps)`` for ``kernel`` (``fwd`` or ``bwd``) at one scan shape:
    a forced setting (:func:`forced_launch`), else the measured :data:`LAUNCH_TABLE` entry, else
    the defaults."""
    block, warps = LAUNCH_TABLE.get((kernel, groups, d, n, length), (_block(groups, d), DEFAULT_WARPS))
    forced_block, forced_warps = _forced_launch
    # at least 4 channels (or all d): the int32 guard (_elements_per_sample) counts on it
    block = min(max(forced_block or block, 4), triton.next_power_of_2(d))
    return block, forced_warps or warps


@contextlib.contextmanager
def forced_launch(block: int | None = None, num_warps: int | None = None) -> Iterator[None]:
    """Launch every kernel inside with these settings (None keeps the table's): how the GPU check
    times each candidate."""
    global _forced_launch
    if block is not None and (block < 1 or block & (block - 1)):
        raise ValueError(f"block must be a power of two, got {block}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    saved, _forced_launch = _forced_launch, (block, num_warps)
    try:
        yield
    finally:
        _forced_launch = saved


def _chunk(length: int) -> int:
    """Backward chunk: ~sqrt(L) steps (at most ``CHUNK``), which minimises checkpoints + scratch."""
    return min(CHUNK, triton.next_power_of_2(math.isqrt(max(length - 1, 0)) + 1))


def _elements_per_sample(u_rows: int, groups: int, d: int, length: int, n: int) -> int:
    """Elements per sample of the largest buffer of a launch, for any batch size (int32 guard)."""
    chunk, n_pad = _chunk(length), triton.next_power_of_2(n)
    most_blocks = triton.cdiv(d, min(4, triton.next_power_of_2(d)))
    states = groups * d * n_pad * max(chunk, triton.cdiv(length, chunk))
    return max(u_rows * length, groups * d * length, states, groups * most_blocks * length * n)


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch under ``t``'s GPU (Triton launches on the current device); nothing for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _ScanTriton(torch.autograd.Function):
    """Autograd wrapper of both kernels: saves the (fp32, contiguous) inputs; backward recomputes.

    ``u`` is ``[b, K*d, L]`` (one slice per direction) or, with ``shared_u``, ``[b, d, L]`` read
    by every direction, whose outputs are then summed; ``perms`` ``[K, L]`` int32 or None.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, perms, delta_softplus, shared_u):
        dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, delta_bias)]
        f32 = [x.float().contiguous() for x in (u, delta, A, B, C)]
        zeros = torch.zeros(A.shape[0], device=u.device)
        Df = zeros if D is None else D.float().contiguous()
        bf = zeros if delta_bias is None else delta_bias.float().contiguous()
        b, length = u.shape[0], u.shape[-1]
        groups, n = B.shape[1], A.shape[1]
        d = A.shape[0] // groups
        block, warps = launch_settings("fwd", groups, d, n, length)
        grid = (b, groups, triton.cdiv(d, block))
        table = perms if perms is not None else torch.zeros(1, dtype=torch.int32, device=u.device)
        y = torch.empty(b, groups, d, length, device=u.device, dtype=torch.float32)
        with _on_device(u):
            _fwd_kernel[grid](
                *f32, Df, bf, table, y, u.shape[1], 0 if shared_u else d, d, groups, n, length,
                PERM=perms is not None, SOFTPLUS=bool(delta_softplus), BLOCK=block,
                N_PAD=triton.next_power_of_2(n), num_warps=warps,
            )  # fmt: skip
        ctx.save_for_backward(*f32, Df, bf, table)
        ctx.dtypes = dtypes
        ctx.softplus = bool(delta_softplus)
        ctx.shared_u = bool(shared_u)
        ctx.permuted = perms is not None
        return y.sum(1) if shared_u else y.view(b, groups * d, length)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        u, delta, A, B, C, Df, bf, table = ctx.saved_tensors
        b, length = u.shape[0], u.shape[-1]
        groups, n = B.shape[1], A.shape[1]
        d = A.shape[0] // groups
        block, warps = launch_settings("bwd", groups, d, n, length)
        n_blocks = triton.cdiv(d, block)
        chunk = _chunk(length)
        n_chunks = triton.cdiv(length, chunk)
        n_pad = triton.next_power_of_2(n)
        dev = u.device
        ckpt = torch.empty(b, groups * d, n_chunks, n_pad, device=dev)
        scratch = torch.empty(b, groups * d, chunk, n_pad, device=dev)
        du = torch.empty(b, groups, d, length, device=dev)
        ddt = torch.empty_like(delta)
        dA = torch.empty(b, groups * d, n, device=dev)
        dB = torch.empty(b, groups, n_blocks, length, n, device=dev)
        dC = torch.empty(b, groups, n_blocks, length, n, device=dev)
        dD = torch.empty(b, groups * d, device=dev)
        dbias = torch.empty(b, groups * d, device=dev)
        with _on_device(u):
            _bwd_kernel[(b, groups, n_blocks)](
                u, delta, A, B, C, Df, bf, table, grad_y.float().contiguous(), ckpt, scratch,
                du, ddt, dA, dB, dC, dD, dbias,
                u.shape[1], 0 if ctx.shared_u else d, d, groups, n, length, n_chunks,
                PERM=ctx.permuted, SOFTPLUS=ctx.softplus, BLOCK=block, N_PAD=n_pad, CH=chunk,
                num_warps=warps,
            )  # fmt: skip
        grads = [
            du.sum(1) if ctx.shared_u else du.view(u.shape),
            ddt,
            dA.sum(0),
            dB.sum(2).transpose(2, 3),
            dC.sum(2).transpose(2, 3),
            dD.sum(0),
            dbias.sum(0),
        ]
        out = [None if dt is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*out, None, None, None)


def _apply(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    perms: torch.Tensor | None,
    delta_softplus: bool,
    shared_u: bool,
) -> torch.Tensor:
    """Run :class:`_ScanTriton`, split over the batch when a buffer would overflow int32 offsets."""
    groups, n = B.shape[1], A.shape[1]
    per_sample = _elements_per_sample(u.shape[1], groups, A.shape[0] // groups, u.shape[-1], n)
    if per_sample >= _MAX_ELEMENTS:
        raise ValueError(f"selective scan too large for the triton backend: {per_sample} elements per sample")
    rest = (D, delta_bias, perms, delta_softplus, shared_u)
    batch = u.shape[0]
    if batch * per_sample < _MAX_ELEMENTS:
        return _ScanTriton.apply(u, delta, A, B, C, *rest)
    step = max(1, _MAX_ELEMENTS // per_sample)
    parts = [
        _ScanTriton.apply(u[i : i + step], delta[i : i + step], A, B[i : i + step], C[i : i + step], *rest)
        for i in range(0, batch, step)
    ]
    return torch.cat(parts)


def _check_usable(t: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise ValueError("backend 'triton' needs triton (pip install triton)")
    if not (t.is_cuda or INTERPRET):
        raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")


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
    _check_usable(u)
    return _apply(u, delta, A, B, C, D, delta_bias, None, delta_softplus, shared_u=False)


def cross_scan_triton(
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
    """SS2D's K-direction scan in one call, every tensor in pixel order: ``[b, d_x, L]`` (fp32).

    ``perms [K, L]``: row ``k`` is a permutation of ``0..L-1``, the pixel visited at each step of
    direction ``k``. ``delta [b, K, d, L]``, ``B, C [b, K, N, L]``, ``A [K*d, N]``, ``D,
    delta_bias [K*d]`` (or None) hold direction ``k``'s parameters at each pixel. Without
    ``grouped``, every direction scans all ``d = d_x`` channels of ``x`` and the result is the sum
    of the K directions' outputs at each pixel, i.e. ``scan_decode(selective_scan_fn(scan_encode(x)
    ...))``. With ``grouped``, direction ``k`` scans only channels ``k*d .. k*d+d-1`` of ``x``
    (``d = d_x / K``) and writes the same channels of the result. Differentiable in every tensor
    but ``perms``; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``.
    """
    _check_usable(x)
    check_cross_scan_args(x, delta, A, B, C, D, delta_bias, perms, grouped)
    table = perms.to(device=x.device, dtype=torch.int32).contiguous()
    return _apply(x, delta, A, B, C, D, delta_bias, table, delta_softplus, shared_u=not grouped)
