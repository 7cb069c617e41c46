# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""Mamba S6 selective scan with interchangeable backends (spec section 2).

Shapes follow mamba-ssm's ``selective_scan_fn`` with ``z=None`` and no returned state:
``u, delta: [b, K*d, L]``, ``A: [K*d, N]``, ``B, C: [b, K, N, L]`` (group ``k`` is shared by
channels ``k*d .. k*d+d-1``), ``D, delta_bias: [K*d]``; the result is ``[b, K*d, L]`` fp32::

    delta = softplus(delta + delta_bias)            (if delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = sum_n C_t[n] * h_t[n] + D * u_t

Backends: ``ref`` (step-by-step loop, the test oracle), ``chunked`` (exact pure-PyTorch
parallel scan, CPU or GPU), ``cpu`` (fused Numba kernels for forward and backward that keep
no per-step states, CPU tensors only, needs numba; see ``selective_scan_cpu``), ``triton``
(Triton kernels for forward and backward, CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``; see ``selective_scan_triton``) and ``mamba_ssm`` (the CUDA kernel,
CUDA tensors only), and ``export`` (a blocked scan in plain tensor ops that exports to
standard ONNX operators; see ``selective_scan_export``).

This module is the one place that chooses a backend: :func:`resolve_backend` for a plain scan,
:func:`cross_scan_route` for a K-direction cross-scan (which also says whether the backend fuses
the directions into its kernels), and :func:`forced_backend` to run a block of code (an export,
a benchmark) with one backend whatever the model's settings.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from model.ops.scan_reference import (
    check_scan_args,
    flush_denormals_on_cpu,
    scan_decode,
    scan_encode,
    selective_scan_chunked,
    selective_scan_ref,
)

_PURE_BACKENDS = ("chunked", "ref", "export")


def prepare_cpu() -> None:
    """Put the CPU in the state the scan leaves it in, before any other work of a run.

    Flushes denormals and starts Numba's thread pool (when the ``cpu`` backend is
    available), so that the first training step computes exactly like the later ones and
    a run, or a resumed run, is reproducible bit for bit.
    """
    flush_denormals_on_cpu()
    if _numba_available():
        from model.ops.selective_scan_cpu import start_thread_pool

        start_thread_pool()


_MAMBA_SSM_IMPORT_ERROR: list[str] = []


@functools.cache
def _mamba_ssm_kernel():
    """The mamba-ssm CUDA op, imported once; None when the package or its compiled extension fails.

    Any exception counts, not only ImportError: a wheel built for another CUDA or PyTorch
    raises OSError or RuntimeError (undefined symbols) when its extension loads.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except Exception as err:  # whatever breaks the import, the backend is absent
        _MAMBA_SSM_IMPORT_ERROR.append(f"{type(err).__name__}: {err}")
        return None
    return kernel


@functools.cache
def _numba_available() -> bool:
    """Whether the ``cpu`` backend can run (imports numba on the first call only)."""
    from model.ops.selective_scan_cpu import NUMBA_AVAILABLE

    return NUMBA_AVAILABLE


@functools.cache
def _triton_available() -> bool:
    """Whether the ``triton`` backend can run: triton imports and CUDA (or its interpreter) is there."""
    from model.ops.selective_scan_triton import INTERPRET, TRITON_AVAILABLE

    return TRITON_AVAILABLE and (INTERPRET or torch.cuda.is_available())


BACKENDS = ("auto", "mamba_ssm", "triton", "cpu", "chunked", "ref", "export")


def backend_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` on this machine, or None when it can."""
    if backend not in BACKENDS:
        return f"no such backend; use one of {', '.join(BACKENDS)}"
    if backend == "auto" or backend in _PURE_BACKENDS:
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the Numba kernels take CPU tensors, not {device}"
        return None if _numba_available() else "it needs numba (pip install numba)"
    if device.type != "cuda":
        interpreted = backend == "triton" and _triton_available()
        return None if interpreted else f"it needs a CUDA device, and this run computes on {device}"
    if backend == "triton":
        return None if _triton_available() else "it needs the triton package"
    if _mamba_ssm_kernel() is None:
        why = f" ({_MAMBA_SSM_IMPORT_ERROR[0]})" if _MAMBA_SSM_IMPORT_ERROR else ""
        return f"it needs the mamba-ssm package built for this machine's CUDA and PyTorch{why}"
    return None


def available_backends() -> list[str]:
    """Backends usable on this machine (``mamba_ssm`` only with CUDA and the package,
    ``triton`` only with triton and CUDA or its interpreter, ``cpu`` only with numba)."""
    names = list(_PURE_BACKENDS)
    if _numba_available():
        names.insert(0, "cpu")
    if _triton_available():
        names.insert(0, "triton")
    if torch.cuda.is_available() and _mamba_ssm_kernel() is not None:
        names.insert(0, "mamba_ssm")
    return names


_checked: dict[tuple[str, str], bool] = {}


def _smoke_inputs(device: torch.device) -> list[torch.Tensor]:
    """Small scan inputs (b=2, K=2, d=3, L=37, N=16) on ``device``, from a private generator."""
    g = torch.Generator().manual_seed(1234)
    b, k, d, length, n = 2, 2, 3, 37, 16
    tensors = [
        torch.randn(b, k * d, length, generator=g),
        torch.randn(b, k * d, length, generator=g) * 0.5,
        -torch.rand(k * d, n, generator=g) * 2 - 0.1,
        torch.randn(b, k, n, length, generator=g),
        torch.randn(b, k, n, length, generator=g),
        torch.randn(k * d, generator=g),
        torch.randn(k * d, generator=g) * 0.1,
    ]
    return [t.to(device).requires_grad_(True) for t in tensors]


def _scan_and_grads(scan, device: torch.device) -> list[torch.Tensor]:
    """Output and every input gradient of one small scan (softplus on) run by ``scan``."""
    leaves = _smoke_inputs(device)
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        y = scan(*leaves)
        weight = torch.linspace(-1.0, 1.0, y.numel(), device=device).view_as(y)
        grads = torch.autograd.grad((y * weight).sum(), leaves)
    return [y.detach(), *grads]


def smoke_test(scan: Callable[..., torch.Tensor], device: torch.device, rtol: float = 1e-3) -> str | None:
    """Compare ``scan(u, delta, A, B, C, D, delta_bias)`` (a softplus scan) with ``ref``: output and
    all gradients; None when each is within ``rtol`` of its largest value, else what differs."""
    ref = functools.partial(selective_scan_ref, delta_softplus=True)
    try:
        got = _scan_and_grads(scan, device)
    except Exception as err:  # any failure means the backend is unusable here
        return f"{type(err).__name__}: {err}"
    want = _scan_and_grads(ref, device)
    names = ("output", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
    for name, a, b in zip(names, got, want):
        scale = float(b.abs().max()) or 1.0
        if a.shape != b.shape or not bool(torch.isfinite(a).all()):
            return f"{name}: shape {tuple(a.shape)} or non-finite values"
        err = float((a.float() - b).abs().max()) / scale
        if err > rtol:
            return f"{name} differs from the reference by {err:.2e} (relative)"
    return None


def backend_works(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` passes :func:`smoke_test` on ``device``; checked once per process and
    device. A failure warns once, naming the backend and the reason."""
    key = (name, str(device))
    if key not in _checked:
        problem = smoke_test(functools.partial(selective_scan_fn, delta_softplus=True, backend=name), device)
        if problem:
            warnings.warn(
                f"selective-scan backend {name!r} failed its first-use check on {device} ({problem}); "
                "backend 'auto' will not use it in this process",
                RuntimeWarning,
                stacklevel=3,
            )
        _checked[key] = problem is None
    return _checked[key]


_forced: list[str] = []


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Within the block every scan of this process runs with ``backend``, whatever its module's
    ``model.scan.backend`` says (the supported way to export a model with the ``export`` backend or
    to benchmark one backend; blocks nest, the innermost wins)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; use one of {', '.join(BACKENDS)}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a scan asked for with ``backend`` on ``device``: the one of an enclosing
    :func:`forced_backend` block if any, else what ``auto`` stands for, else ``backend`` unchanged.

    CUDA: ``mamba_ssm`` when it imports, is not ruled out by deterministic mode (its backward
    accumulates with atomics, ``torch.use_deterministic_algorithms(True)``, which
    ``trainer.deterministic=True`` sets) and passes its first-use check, else ``triton`` when
    available and checked, else ``chunked``. CPU: ``cpu`` when numba is installed, else ``ref``,
    whose step loop over cache-sized tensors beats the parallel scan's passes over whole
    sequences (see docs/scan_backends.md).
    """
    if _forced:
        backend = _forced[-1]
    if backend != "auto":
        return backend
    if device.type == "cuda":
        deterministic = torch.are_deterministic_algorithms_enabled()
        if not deterministic and _mamba_ssm_kernel() is not None and backend_works("mamba_ssm", device):
            return "mamba_ssm"
        if _triton_available() and backend_works("triton", device):
            return "triton"
        return "chunked"
    return "cpu" if _numba_available() else "ref"


CrossScanFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class CrossScanRoute:
    """How a K-direction cross-scan runs with the resolved ``backend``.

    ``fused``: a kernel that reads each direction's order through the permutation table itself,
    ``(x, delta, A, B, C, D, delta_bias, perms, *, delta_softplus, grouped)``, channels-first
    (``x [B, D, L]``, ``delta [B, K, d, L]``) or, with ``channels_last``, rows ``x [B, L, D]``
    and ``delta [K, B, L, d]``; None when the backend scans sequences already in scan order,
    read with ``encode`` (``[B, C, H, W] -> [B, K, C, L]``) and written back with ``decode``
    (``[B, K, C, L] -> [B, C, H*W]``), which equal :func:`~model.ops.scan_reference.scan_encode`
    / :func:`~model.ops.scan_reference.scan_decode`.
    """

    backend: str
    fused: CrossScanFn | None = None
    channels_last: bool = False
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = scan_encode
    decode: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor] = scan_decode


def cross_scan_route(backend: str, device: torch.device) -> CrossScanRoute:
    """The route of a cross-scan asked for with ``backend`` on ``device`` (see :func:`resolve_backend`).

    ``triton`` and ``cpu`` fuse the directions into their kernels; ``export`` reads and writes the
    scan orders as Gathers of whole channel vectors (what onnxruntime runs fastest); the others
    gather, scan with :func:`selective_scan_fn` and scatter back.
    """
    name = resolve_backend(backend, device)
    if name == "triton":
        from model.ops.selective_scan_triton import cross_scan_triton

        return CrossScanRoute(name, fused=cross_scan_triton)
    if name == "cpu":
        from model.ops.selective_scan_cpu import cross_scan_cpu_channels_last

        return CrossScanRoute(name, fused=cross_scan_cpu_channels_last, channels_last=True)
    if name == "export":
        from model.ops.selective_scan_export import gather_scan_decode, gather_scan_encode

        return CrossScanRoute(name, encode=gather_scan_encode, decode=gather_scan_decode)
    return CrossScanRoute(name)


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan ``[b, K*d, L] -> [b, K*d, L]`` (fp32), differentiable in every input.

    ``backend``: ``auto``, ``mamba_ssm``, ``triton``, ``cpu``, ``chunked``, ``ref`` or ``export``;
    ``auto`` is resolved by :func:`resolve_backend`.
    """
    if not u.is_cuda:
        flush_denormals_on_cpu()
    if torch.is_autocast_enabled(u.device.type):
        # mixed precision elsewhere, fp32 here: the recurrence's state would lose too much in 16 bits
        with torch.autocast(u.device.type, enabled=False):
            args = (u, delta, A, B, C, D, delta_bias)
            u, delta, A, B, C, D, delta_bias = (None if x is None else x.float() for x in args)
            return selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus, backend)
    check_scan_args(u, delta, A, B, C, D, delta_bias)
    backend = resolve_backend(backend, u.device)
    if backend == "mamba_ssm":
        kernel = _mamba_ssm_kernel()
        if kernel is None or not u.is_cuda:
            why = f" (import failed: {_MAMBA_SSM_IMPORT_ERROR[0]})" if _MAMBA_SSM_IMPORT_ERROR else ""
            raise ValueError(
                f"backend 'mamba_ssm' needs mamba-ssm and CUDA tensors{why}; "
                f"available: {available_backends()}"
            )
        return kernel(
            u.float(),
            delta.float(),
            A.float(),
            B.float(),
            C.float(),
            None if D is None else D.float(),
            z=None,
            delta_bias=None if delta_bias is None else delta_bias.float(),
            delta_softplus=delta_softplus,
            return_last_state=False,
        )
    if backend == "cpu":
        from model.ops.selective_scan_cpu import selective_scan_cpu

        if not _numba_available():
            raise ValueError(
                f"backend 'cpu' needs numba (pip install numba); available: {available_backends()}"
            )
        if any(t is not None and t.device.type != "cpu" for t in (u, delta, A, B, C, D, delta_bias)):
            raise ValueError("selective-scan backend 'cpu' takes CPU tensors only")
        return selective_scan_cpu(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "triton":
        from model.ops.selective_scan_triton import INTERPRET, selective_scan_triton

        if not _triton_available():
            raise ValueError(
                "backend 'triton' needs triton and CUDA (or TRITON_INTERPRET=1); "
                f"available: {available_backends()}"
            )
        if not (u.is_cuda or INTERPRET):
            raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        return selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "export":
        from model.ops.selective_scan_export import selective_scan_export

        return selective_scan_export(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    raise ValueError(f"unknown selective-scan backend {backend!r}; available: {available_backends()}")
