"""Scan curves and directions: exactness against the official orders, and encode/decode."""

import hashlib

import numpy as np
import pytest
import torch

from model.mambaad.scan_orders import SCAN_METHODS, curve_order, direction_permutations
from model.ops.scan_reference import inverse_permutations, scan_decode, scan_encode

# Orders produced by the official code's packages (numpy-hilbert-curve 1.0.1 `hilbert.decode`,
# flat = loc[0] + loc[1]*size; pyzorder 0.0.2 `ZOrderIndexer.rc`, flat = c*size + r).
OFFICIAL_HILBERT = {
    2: [0, 2, 3, 1],
    4: [0, 1, 5, 4, 8, 12, 13, 9, 10, 14, 15, 11, 7, 6, 2, 3],
    8: [0, 8, 9, 1, 2, 3, 11, 10, 18, 19, 27, 26, 25, 17, 16, 24, 32, 33, 41, 40, 48, 56, 57, 49,
        50, 58, 59, 51, 43, 42, 34, 35, 36, 37, 45, 44, 52, 60, 61, 53, 54, 62, 63, 55, 47, 46, 38,
        39, 31, 23, 22, 30, 29, 28, 20, 21, 13, 12, 4, 5, 6, 14, 15, 7],
}  # fmt: skip
OFFICIAL_ZORDER = {
    2: [0, 1, 2, 3],
    4: [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
    8: [0, 1, 8, 9, 2, 3, 10, 11, 16, 17, 24, 25, 18, 19, 26, 27, 4, 5, 12, 13, 6, 7, 14, 15, 20,
        21, 28, 29, 22, 23, 30, 31, 32, 33, 40, 41, 34, 35, 42, 43, 48, 49, 56, 57, 50, 51, 58, 59,
        36, 37, 44, 45, 38, 39, 46, 47, 52, 53, 60, 61, 54, 55, 62, 63],
}  # fmt: skip
# SHA-256 of the official orders as little-endian int64 bytes.
OFFICIAL_SHA256 = {
    ("hilbert", 16): "0cf0aed20e0282c36c1e0aa77c275bf82c659246d3e119a196e710d9691c7b18",
    ("hilbert", 32): "d00e826ce8e0686f346d3a813b1b3d2a987a028ff4ea5403992a602b67263a58",
    ("hilbert", 64): "3468c46e5a80bdfd33c9f604676ce10de77646a8b4659df851e77003957c263c",
    ("zorder", 16): "d5ddc8b3b9fcca4a09a561129fba26e965036b4866c99ed9c59e1cea840aa256",
    ("zorder", 32): "f29ee6790149a92f80ca0577b315511451d39e29b5666fa7630db92f4927326f",
    ("zorder", 64): "81df345a195077fd3ed1ac6d5b3330553cb0b07d5f33bf3076847f624e090814",
}


def _official_zigzag(size: int) -> list[int]:
    """The official anti-diagonal order on a square, restated loop by loop."""
    out = []
    for s in range(2 * size - 1):
        lo, hi = max(0, s - size + 1), min(s, size - 1)
        for j in range(lo, hi + 1):
            out.append((s - j) * size + j if s % 2 == 0 else j * size + (s - j))
    return out


@pytest.mark.parametrize("size", [2, 4, 8])
def test_hilbert_and_zorder_match_official_small(size):
    assert curve_order("hilbert", size, size).tolist() == OFFICIAL_HILBERT[size]
    assert curve_order("zorder", size, size).tolist() == OFFICIAL_ZORDER[size]


@pytest.mark.parametrize(("method", "size"), sorted(OFFICIAL_SHA256))
def test_hilbert_and_zorder_match_official_hashes(method, size):
    order = curve_order(method, size, size)
    assert order.dtype == np.int64
    assert hashlib.sha256(order.astype("<i8").tobytes()).hexdigest() == OFFICIAL_SHA256[(method, size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 16])
def test_sweep_scan_zigzag_on_squares(size):
    flat = np.arange(size * size)
    assert curve_order("sweep", size, size).tolist() == flat.tolist()
    snake = flat.reshape(size, size).copy()
    snake[1::2] = snake[1::2, ::-1]
    assert curve_order("scan", size, size).tolist() == snake.reshape(-1).tolist()
    assert curve_order("zigzag", size, size).tolist() == _official_zigzag(size)


def test_zigzag_rectangle():
    # 2x3 grid: diagonals {0}, {1,3} down-left, {4,2} up-right, {5}.
    assert curve_order("zigzag", 2, 3).tolist() == [0, 1, 3, 4, 2, 5]


@pytest.mark.parametrize("shape", [(6, 10), (7, 7), (12, 20), (10, 6), (1, 5), (5, 1), (3, 8), (9, 6)])
@pytest.mark.parametrize("method", SCAN_METHODS)
def test_any_grid_gives_a_permutation(method, shape):
    h, w = shape
    order = curve_order(method, h, w)
    assert sorted(order.tolist()) == list(range(h * w))


@pytest.mark.parametrize(
    "shape", [(6, 10), (7, 7), (12, 20), (10, 6), (9, 6), (6, 9), (3, 8), (5, 13), (1, 7)]
)
def test_generalised_hilbert_is_continuous(shape):
    h, w = shape
    rows, cols = np.divmod(curve_order("hilbert", h, w), w)
    steps = np.abs(np.diff(rows)) + np.abs(np.diff(cols))
    assert np.all(steps == 1)


def test_zorder_on_non_square_skips_padding():
    # 2x3 grid inside the 4x4 Morton square: visiting (0,0) (0,1) (1,0) (1,1) (0,2) (1,2).
    assert curve_order("zorder", 2, 3).tolist() == [0, 1, 3, 4, 2, 5]


def test_unknown_method_and_bad_directions():
    with pytest.raises(ValueError):
        curve_order("spiral", 4, 4)
    with pytest.raises(ValueError):
        direction_permutations("sweep", 4, 4, 6)


def _official_encode(x: torch.Tensor, method: str, k: int) -> torch.Tensor:
    """Official construction: rotate/transpose with torch, flatten, reorder, then flip."""
    b, c, h, w = x.shape
    base = torch.from_numpy(curve_order(method, h, w))
    rot = torch.rot90(x, k=1, dims=(2, 3))
    views = [x, x.transpose(2, 3), rot, rot.transpose(2, 3)][: k // 2]
    xs = torch.stack([v.contiguous().view(b, c, h * w)[..., base] for v in views], dim=1)
    return torch.cat([xs, xs.flip(-1)], dim=1)


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("method", SCAN_METHODS)
def test_encode_matches_official_and_decode_inverts(method, k, size):
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    perms = direction_permutations(method, size, size, k)
    assert perms.dtype == torch.long and perms.shape == (k, size * size)
    for row in perms:
        assert torch.equal(row.sort().values, torch.arange(size * size))
    enc = scan_encode(x, perms)
    assert torch.equal(enc, _official_encode(x, method, k))
    dec = scan_decode(enc, perms, size, size)
    torch.testing.assert_close(dec, k * x.view(2, 3, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 10), (7, 7), (12, 20)])
@pytest.mark.parametrize("method", SCAN_METHODS)
def test_directions_on_non_square(method, shape):
    h, w = shape
    perms = direction_permutations(method, h, w, 8)
    for row in perms:
        assert torch.equal(row.sort().values, torch.arange(h * w))
    assert torch.equal(perms[4:], perms[:4].flip(-1))
    assert torch.equal(perms[0], torch.from_numpy(curve_order(method, h, w)))
    x = torch.randn(1, 2, h, w)
    torch.testing.assert_close(scan_decode(scan_encode(x, perms), perms, h, w), 8 * x.view(1, 2, -1))


def test_inverse_and_gradients():
    perms = direction_permutations("hilbert", 4, 6, 4)
    inv = inverse_permutations(perms)
    assert torch.equal(torch.gather(perms, 1, inv), torch.arange(24).expand(4, 24))
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: scan_encode(t, perms), (x,))
    y = torch.randn(2, 4, 3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: scan_decode(t, perms, 4, 6), (y,))


def test_results_are_independent_copies():
    perms = direction_permutations("scan", 4, 4, 2)
    perms[0, 0] = 99
    assert direction_permutations("scan", 4, 4, 2)[0, 0] == 0
    order = curve_order("scan", 4, 4)
    order[0] = 99
    assert curve_order("scan", 4, 4)[0] == 0
