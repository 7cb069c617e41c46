"""Shared helpers for the selective-scan backend tests: run a backend, compare with tolerance,
and the fused cross-scans' inputs and unfused reference.

Tolerances follow from float32 arithmetic, not from what one machine printed: every kernel is
compared with the ``ref`` backend run in float64 (exact up to ~1e-16), and allowed Higham's
first-order bound for the number of float32 roundings that a value passes through
(:func:`scan_bounds`), relative to the largest magnitude of the reference.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from model.ops import selective_scan_cpu
from model.ops.scan_reference import check_cross_scan_args, inverse_permutations, scan_decode, scan_encode
from model.ops.selective_scan import selective_scan_fn
from tests.rounding import gamma32

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def scan_bounds(t: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(output, gradient) tolerances of a float32 selective scan or cross-scan of the inputs ``t``.

    Each step of the recurrence ``h = exp(delta A) h + delta B u`` rounds about four times (the
    exponent's product, ``exp``, the two products with the add), so the oldest term of an output
    has passed ``4 L`` roundings, then the sum over the ``N`` states and the ``K`` directions, plus
    a few for softplus, the bias and the skip term. Gradients add the sums over the batch and the
    steps (``dA``, ``dD``, the bias) and over a group's channels (``dB``, ``dC``).
    """
    b, k, n, length = t["B"].shape
    channels = t["A"].shape[0] // k
    out = gamma32(4 * length + n + k + 8)
    return out, out + gamma32(b * length + channels)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max absolute error at most ``rel`` times the largest magnitude of ``expected``."""
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def ss2d_bounds(m: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(output, gradient) tolerances of an SS2D module ``m`` on channels-last ``x [B, H, W, C]``:
    the scan's (:func:`scan_bounds`) plus the sums of the projections around it (input and output
    projections, the 3x3 depthwise convolution, the layer norm), and for the weights' gradients
    the sums over the batch's positions."""
    b, h, w, c = x.shape
    d_inner, length = m.d_inner, h * w
    around = c + 9 + 2 * d_inner + 16
    out = gamma32(4 * length + m.d_state + m.num_directions + around)
    return out, out + gamma32(b * length + d_inner)


def run_ss2d(
    m: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, backend: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (input and every parameter) of ``sum(m(x) * weight)`` with ``backend``;
    ``ref`` runs a float64 copy of ``m`` (the reference, see :func:`run_backend`)."""
    if backend == "ref":
        m, x, weight = copy.deepcopy(m).double(), x.double(), weight.double()
    m.scan = dataclasses.replace(m.scan, backend=backend)
    m.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    y = m(leaf)
    (y * weight).sum().backward()
    return y.detach(), {"input": leaf.grad, **{name: p.grad for name, p in m.named_parameters()}}


def run_backend(
    backend: str,
    tensors: dict[str, torch.Tensor],
    use_d: bool = True,
    use_bias: bool = True,
    softplus: bool = True,
    grad_names: tuple[str, ...] = NAMES,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Output and input gradients of ``sum(y * w)`` for fixed random weights ``w``.

    The ``ref`` backend runs float32 inputs in float64: it is the reference the others are held to.
    """
    if backend == "ref":
        tensors = {k: v.double() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    leaves = {k: v.clone().requires_grad_(k in grad_names) for k, v in tensors.items()}
    y = selective_scan_fn(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        leaves["D"] if use_d else None,
        leaves["delta_bias"] if use_bias else None,
        delta_softplus=softplus,
        backend=backend,
    )
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * weight).sum().backward()
    return y.detach(), {k: leaves[k].grad for k in NAMES}


CROSS_NAMES = ("x", "delta", "A", "B", "C", "D", "delta_bias")


def cross_inputs(
    b: int, k: int, d_x: int, length: int, n: int, grouped: bool, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Cross-scan inputs in pixel order and K random direction permutations ``[K, L]``."""
    g = torch.Generator().manual_seed(seed)
    d = d_x // k if grouped else d_x
    perms = torch.stack([torch.randperm(length, generator=g) for _ in range(k)])
    tensors = {
        "x": torch.randn(b, d_x, length, generator=g),
        "delta": torch.randn(b, k, d, length, generator=g) * 0.5,
        "A": -torch.rand(k * d, n, generator=g) - 0.1,
        "B": torch.randn(b, k, n, length, generator=g),
        "C": torch.randn(b, k, n, length, generator=g),
        "D": torch.randn(k * d, generator=g),
        "delta_bias": torch.randn(k * d, generator=g) * 0.3,
    }
    return tensors, perms


def as_reference(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 inputs in float64, for :func:`cross_reference` on the CPU (see :func:`run_backend`)."""
    return {k: v.double() if v.dtype == torch.float32 else v for k, v in t.items()}


def cross_reference(
    t: dict[str, torch.Tensor | None], perms: torch.Tensor, softplus: bool, grouped: bool
) -> torch.Tensor:
    """The unfused path: gather into scan order, ``ref`` scan, scatter back (and sum unless grouped)."""
    b, d_x, length = t["x"].shape
    k, d = perms.shape[0], t["delta"].shape[2]
    perms = perms.to(t["x"].device)

    def scan_order(v: torch.Tensor) -> torch.Tensor:  # [b, K, c, L] pixel order -> scan order
        return torch.gather(v, 3, perms.view(1, k, 1, length).expand(*v.shape))

    xs = scan_order(t["x"].reshape(b, k, d, length)) if grouped else scan_encode(t["x"], perms)
    y = selective_scan_fn(
        xs.reshape(b, k * d, length),
        scan_order(t["delta"]).reshape(b, k * d, length),
        t["A"],
        scan_order(t["B"]),
        scan_order(t["C"]),
        t["D"],
        t["delta_bias"],
        delta_softplus=softplus,
        backend="ref" if t["x"].device.type == "cpu" else "chunked",
    ).view(b, k, d, length)
    if not grouped:
        return scan_decode(y, perms, length, 1)
    inv = inverse_permutations(perms).view(1, k, 1, length).expand(*y.shape)
    return torch.gather(y, 3, inv).reshape(b, d_x, length)


def run_cross(
    fn, tensors: dict[str, torch.Tensor], use_d: bool, use_bias: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Output and input gradients of ``sum(fn(inputs) * w)`` for fixed random weights ``w``."""
    leaves = {key: v.clone().requires_grad_(True) for key, v in tensors.items()}
    args = {
        **leaves,
        "D": leaves["D"] if use_d else None,
        "delta_bias": leaves["delta_bias"] if use_bias else None,
    }
    y = fn(args)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    (y * weight).sum().backward()
    return y.detach(), {key: leaves[key].grad for key in CROSS_NAMES}


def cross_scan_cpu(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,  # noqa: N803
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    D: torch.Tensor | None,  # noqa: N803
    delta_bias: torch.Tensor | None,
    perms: torch.Tensor,
    delta_softplus: bool = False,
    grouped: bool = False,
) -> torch.Tensor:
    """The ``cpu`` backend's fused cross-scan with the arguments of
    :func:`model.ops.selective_scan_triton.cross_scan_triton` (every tensor in pixel order,
    channels first), for tests that hold both to the same reference: transposes to
    :func:`model.ops.selective_scan_cpu.cross_scan_cpu_channels_last`, which SS2D calls."""
    check_cross_scan_args(x, delta, A, B, C, D, delta_bias, perms, grouped)
    y = selective_scan_cpu.cross_scan_cpu_channels_last(
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
