# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""CPU selective scan (backend ``cpu``): the torch side of the Numba kernels.

Same semantics and shapes as :func:`model.ops.selective_scan.selective_scan_fn`. The
PyTorch backends spend their time in thousands of small tensor ops and keep every state
``h_t`` for backward (``b*K*d*L*N`` floats); the kernels (:mod:`model.ops.cpu_kernels`) run
fused loops instead, and this module gives them their arrays, threads and autograd. The
autograd graph holds nothing but the inputs, and a backward thread's scratch
(:func:`backward_scratch_bytes`: 0.8 MB plus ``2.25 * 64`` floats per step for N = 16) does not
grow with the batch or the channels.

:func:`cross_scan_cpu_channels_last` runs SS2D's K-direction scan fused, so SS2D never
gathers its input into the K scan orders nor scatters outputs and gradients back.

Numba is optional: without it this module still imports, :data:`NUMBA_AVAILABLE` is False
and :func:`selective_scan_cpu` raises ``ValueError``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from model.ops.cpu_kernels import (
    BWD_LANES,
    LANES,
    backward_scratch_sizes,
    backward_tasks,
    checkpoint_shape,
    forward_kernel,
)
from model.ops.cpu_math import NUMBA_AVAILABLE
from model.ops.scan_reference import check_cross_scan_args

if NUMBA_AVAILABLE:
    import numba

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
    the gradients: per thread, whatever the batch, the channels and ``length``, the buffers of
    one chunk (0.8 MB for 16 states). The states every 64 steps that it starts from are kept by
    the forward pass (:func:`model.ops.cpu_kernels.checkpoint_shape`: ``n_state`` floats per
    channel, rounded up to 64 channels, and per 64 steps, per sample).
    """
    if not NUMBA_AVAILABLE:
        raise ValueError("selective-scan backend 'cpu' needs numba (pip install numba)")
    f32, f64 = backward_scratch_sizes(length, n_state, BWD_LANES)
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
_NO_CHECKPOINTS = torch.zeros((0, 0, 0, 0, 0), dtype=torch.float32)


def _merge_directions(rows: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Direction-major ``[K, b, L, d]`` to the image's channels-last ``[b, L, d_x]``: the K
    directions summed in a fixed order, or (``grouped``) side by side as ``d_x = K*d`` channels."""
    if grouped:
        groups, b, length, d = rows.shape
        return rows.permute(1, 2, 0, 3).reshape(b, length, groups * d)
    return _sum_rows(rows)


def _checkpoints(ctx, batch: int, groups: int, per_group: int, length: int, n_state: int) -> torch.Tensor:
    """The buffer for the states the forward keeps for the backward; empty (none kept) when no
    input needs a gradient."""
    if not any(ctx.needs_input_grad):
        return _NO_CHECKPOINTS
    return torch.empty(checkpoint_shape(batch, groups, per_group, length, n_state), dtype=torch.float32)


def _run_backward(
    arrays: tuple, softplus: bool, dout, du, ddelta, order: np.ndarray, ckpts: torch.Tensor
) -> tuple:
    """Run the backward kernels on the kernel inputs ``arrays`` (:func:`_arrays`) and the forward's
    checkpoints, writing the input gradients into ``du`` and ``ddelta`` (numpy views); returns
    dA, dD and dbias summed over the batch in a fixed order, and dBt, dCt ``[b, K, L, N]`` in scan
    order."""
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
        BWD_LANES,
        order,
        ckpts.numpy(),
    )
    _run_tasks(backward_tasks, args, batch * groups, backward_scratch_sizes(length, n_state, BWD_LANES))
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
        ctx.delta_softplus = delta_softplus
        arrays = _arrays(u, delta, A, B, C, D, delta_bias)
        out = torch.empty(u.shape, dtype=torch.float32)
        batch, groups, length, n_state = arrays[3].shape
        ckpts = _checkpoints(ctx, batch, groups, A.shape[0] // groups, length, n_state)
        _set_threads()
        forward_kernel(
            *(t.numpy() for t in arrays), delta_softplus, out.numpy(), LANES, _NO_ORDER, ckpts.numpy()
        )
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, ckpts)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, delta_bias, ckpts = ctx.saved_tensors
        arrays = _arrays(u, delta, A, B, C, D, delta_bias)
        du = torch.empty_like(arrays[0])
        ddelta = torch.empty_like(du)
        dout = grad_out.to(torch.float32).contiguous().numpy()
        sums = _run_backward(arrays, ctx.delta_softplus, dout, du.numpy(), ddelta.numpy(), _NO_ORDER, ckpts)
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
        ctx.delta_softplus, ctx.grouped = delta_softplus, grouped
        groups, b, length, d = delta.shape
        arrays, order = _cross_arrays(x, delta, A, B, C, D, delta_bias, perms)
        out = torch.empty((groups, b, length, d), dtype=torch.float32)
        ckpts = _checkpoints(ctx, b, groups, d, length, A.shape[1])
        _set_threads()
        rows = out.view(-1, length, d).numpy()
        forward_kernel(*(t.numpy() for t in arrays), delta_softplus, rows, LANES, order, ckpts.numpy())
        ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, perms, ckpts)
        return _merge_directions(out, grouped)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, delta, A, B, C, D, delta_bias, perms, ckpts = ctx.saved_tensors
        groups, b, length, d = delta.shape
        arrays, order = _cross_arrays(x, delta, A, B, C, D, delta_bias, perms)
        du = torch.empty((groups, b, length, d), dtype=torch.float32)
        ddelta = torch.empty_like(du)
        dout = grad_out.to(torch.float32).contiguous().numpy()
        rows = (du.view(-1, length, d).numpy(), ddelta.view(-1, length, d).numpy())
        sums = _run_backward(arrays, ctx.delta_softplus, dout, *rows, order, ckpts)
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
    views = (x.transpose(1, 2), delta.permute(1, 0, 3, 2), A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1))
    check_cross_scan_args(*views, D, delta_bias, perms, grouped)
    args = (x, delta, A, B, C, D, delta_bias, perms.to(x.device))
    return CrossScanCPU.apply(*args, bool(delta_softplus), bool(grouped))


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
