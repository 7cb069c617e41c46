"""Tolerances from float32 arithmetic, for tests that compare two computations of one result.

Two float32 evaluations that sum in another order (another batch size, thread count, process
split, backend or exported graph) differ by rounding alone. How much is not a constant to tune
on one machine: a scan's bound follows from counting its roundings (:func:`gamma32`,
``tests/scan_helpers.py``); a whole network rounds through too many sums for a useful bound, so
its rounding error is measured in the test itself against a float64 copy of the same network
(:func:`float32_error`), on the machine and thread count the test runs with.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from model.mambaad.scan_orders import ScanOptions

U32 = 2.0**-24  # float32 unit roundoff
# |a - b| <= |a - exact| + |b - exact|: each float32 evaluation lies a few units of roundoff from
# the exact maps, the measured one and the other (other order, other operators) alike; allow the
# pair ten times the measured error. Any wrong image, resize, normalisation or weight moves maps
# by 1e-3 or more, three orders of magnitude above the ~1e-6 that rounding gives.
HEADROOM = 10.0


def gamma32(n: int) -> float:
    """``n u / (1 - n u)``: the relative error bound of a float32 value after ``n`` roundings (a sum
    of ``n + 1`` terms, a product of ``n + 1`` factors): Higham, *Accuracy and Stability of
    Numerical Algorithms*, section 3.1."""
    return n * U32 / (1 - n * U32)


def float64_twin(net: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``net`` whose scans run on the ``chunked`` backend (any dtype, fast)."""
    twin = copy.deepcopy(net).double()
    for module in twin.modules():
        if isinstance(getattr(module, "scan", None), ScanOptions):
            module.scan = dataclasses.replace(module.scan, backend="chunked")
    return twin


@torch.no_grad()
def float32_error(net: torch.nn.Module, imgs: torch.Tensor) -> float:
    """Largest difference of ``net.predict`` maps and scores (float32) from its float64 twin."""
    maps, scores = net.predict(imgs)
    maps64, scores64 = float64_twin(net).predict(imgs.double())
    assert maps64.dtype == torch.float64
    return max(float((maps.double() - maps64).abs().max()), float((scores.double() - scores64).abs().max()))


def maps_tolerance(net: torch.nn.Module, imgs: torch.Tensor) -> float:
    """Absolute tolerance for two float32 computations of ``net``'s maps and scores on ``imgs``."""
    return HEADROOM * float32_error(net, imgs)
