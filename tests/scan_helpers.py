"""Shared helpers for the selective-scan backend tests: run a backend, compare with tolerance,
and the fused cross-scans' inputs and unfused reference."""

from __future__ import annotations

import torch

from model.ops.selective_scan import selective_scan_fn
from model.scan import inverse_permutations, scan_decode, scan_encode

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max absolute error at most ``rel`` times the largest magnitude of ``expected``."""
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def run_backend(
    backend: str,
    tensors: dict[str, torch.Tensor],
    use_d: bool = True,
    use_bias: bool = True,
    softplus: bool = True,
    grad_names: tuple[str, ...] = NAMES,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Output and input gradients of ``sum(y * w)`` for fixed random weights ``w``."""
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
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
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
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y * weight).sum().backward()
    return y.detach(), {key: leaves[key].grad for key in CROSS_NAMES}
