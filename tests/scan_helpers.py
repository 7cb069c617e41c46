"""Shared helpers for the selective-scan backend tests: run a backend, compare with tolerance."""

from __future__ import annotations

import torch

from model.ops.selective_scan import selective_scan_fn

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
