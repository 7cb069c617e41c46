"""MambaAD's scan settings, hybrid-scan curves and K scan directions (spec section 1).

A *curve order* lists the row-major flat indices of an ``h x w`` grid in visiting order.
A *direction permutation* applies a curve to one of four views of the grid (identity,
transpose, 90-degree rotation, rotation then transpose), optionally read backwards; the
decoder runs the selective scan along each of the K permutations and sums the results
after undoing them. On power-of-two squares the ``hilbert`` and ``zorder`` orders are
identical to the official implementation (Skilling's Hilbert decoding as packaged in
``numpy-hilbert-curve``; Morton order as in ``pyzorder``); other grid shapes use
generalisations that the official code does not support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from model.ops.scan_reference import check_orders

SCAN_METHODS = ("sweep", "scan", "zigzag", "zorder", "hilbert")
NUM_DIRECTIONS = (2, 4, 8)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _sweep(h: int, w: int) -> np.ndarray:
    return np.arange(h * w, dtype=np.int64)


def _boustrophedon(h: int, w: int) -> np.ndarray:
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    grid[1::2] = grid[1::2, ::-1]
    return grid.reshape(-1)


def _zigzag(h: int, w: int) -> np.ndarray:
    """Anti-diagonals r + c = s; even s runs up-right (column rising), odd s down-left (row rising)."""
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    diag = rows + cols
    along = np.where(diag % 2 == 0, cols, rows)
    return np.lexsort((along, diag)).astype(np.int64)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a zero bit above every bit of ``v`` (bit i moves to bit 2i)."""
    v = v.astype(np.uint64)
    out = np.zeros_like(v)
    for bit in range(32):
        out |= ((v >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit)
    return out


def _morton(h: int, w: int) -> np.ndarray:
    """Morton order (column bits on even positions, row bits on odd), absent cells of the
    enclosing power-of-two square skipped."""
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    code = _spread_bits(cols) | (_spread_bits(rows) << np.uint64(1))
    return np.argsort(code, kind="stable").astype(np.int64)


def _hilbert_pow2(size: int) -> np.ndarray:
    """Skilling's 2-D Hilbert decoding of indices 0..size^2-1 (axis 0 = column, axis 1 = row)."""
    bits = size.bit_length() - 1
    if bits == 0:
        return np.zeros(1, dtype=np.int64)
    idx = np.arange(size * size, dtype=np.int64)
    # Transposed form: the index's bits, most significant first, alternate between axis 0 and axis 1.
    axes = [np.zeros_like(idx), np.zeros_like(idx)]
    for level in range(bits):
        for dim in range(2):
            bit = (idx >> (2 * level + 1 - dim)) & 1
            axes[dim] |= bit << level
    # Gray decode of the interleaved bit string.
    top = axes[1] >> 1
    axes[1] ^= axes[0]
    axes[0] ^= top
    # Undo the excess rotations/reflections, from the second-lowest bit upwards.
    q = 2
    while q != size:
        low = q - 1
        for dim in (1, 0):
            set_ = (axes[dim] & q) != 0
            swap = (axes[0] ^ axes[dim]) & low
            swap = np.where(set_, 0, swap)
            axes[0] = np.where(set_, axes[0] ^ low, axes[0] ^ swap)
            if dim:
                axes[dim] ^= swap
        q <<= 1
    return axes[0] + axes[1] * size


def _gilbert_cells(h: int, w: int) -> list[tuple[int, int]]:
    """Generalised Hilbert curve (Cervený's 'gilbert' construction) as (row, col) cells.

    The rectangle is described by an origin and two edge vectors: ``a`` along the
    direction of travel and ``b`` across it. Long rectangles are halved along ``a``;
    otherwise the rectangle is split into a leg across ``b``, a long run along ``a`` and a
    leg back, with split sizes nudged to even lengths so that every step is to a
    4-neighbour whenever the parity of the grid allows it.
    """
    cells: list[tuple[int, int]] = []

    def sign(v: int) -> int:
        return (v > 0) - (v < 0)

    def walk(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> None:
        length = abs(ax + ay)
        breadth = abs(bx + by)
        ux, uy = sign(ax), sign(ay)
        vx, vy = sign(bx), sign(by)
        if breadth == 1 or length == 1:
            n, sx, sy = (length, ux, uy) if breadth == 1 else (breadth, vx, vy)
            for i in range(n):
                cells.append((y + i * sy, x + i * sx))
            return
        hax, hay = ax // 2, ay // 2
        hbx, hby = bx // 2, by // 2
        if 2 * length > 3 * breadth:
            if abs(hax + hay) % 2 and length > 2:
                hax, hay = hax + ux, hay + uy
            walk(x, y, hax, hay, bx, by)
            walk(x + hax, y + hay, ax - hax, ay - hay, bx, by)
            return
        if abs(hbx + hby) % 2 and breadth > 2:
            hbx, hby = hbx + vx, hby + vy
        walk(x, y, hbx, hby, hax, hay)
        walk(x + hbx, y + hby, ax, ay, bx - hbx, by - hby)
        walk(
            x + (ax - ux) + (hbx - vx),
            y + (ay - uy) + (hby - vy),
            -hbx,
            -hby,
            -(ax - hax),
            -(ay - hay),
        )

    # A path from one corner to the far end of the travel axis exists with unit steps only
    # when that axis is even or the grid has an odd number of cells; pick the axis accordingly.
    along_w = w >= h
    if (h * w) % 2 == 0 and (w % 2 == 1 if along_w else h % 2 == 1):
        along_w = not along_w
    if along_w:
        walk(0, 0, w, 0, 0, h)
    else:
        walk(0, 0, 0, h, w, 0)
    return cells


def _hilbert(h: int, w: int) -> np.ndarray:
    if h == w and _is_pow2(h):
        return _hilbert_pow2(h).astype(np.int64)
    cells = np.asarray(_gilbert_cells(h, w), dtype=np.int64).reshape(-1, 2)
    return cells[:, 0] * w + cells[:, 1]


_CURVES = {
    "sweep": _sweep,
    "scan": _boustrophedon,
    "zigzag": _zigzag,
    "zorder": _morton,
    "hilbert": _hilbert,
}


@lru_cache(maxsize=256)
def _curve_cached(method: str, h: int, w: int) -> np.ndarray:
    if method not in _CURVES:
        raise ValueError(f"unknown scan method {method!r}; expected one of {SCAN_METHODS}")
    if h < 1 or w < 1:
        raise ValueError(f"grid must be non-empty, got {h}x{w}")
    order = np.ascontiguousarray(_CURVES[method](h, w), dtype=np.int64)
    order.setflags(write=False)
    return order


def curve_order(method: str, h: int, w: int) -> np.ndarray:
    """Row-major flat indices of an ``h x w`` grid in the visiting order of ``method``.

    Methods: ``sweep`` (row-major), ``scan`` (odd rows reversed), ``zigzag`` (alternating
    anti-diagonals), ``zorder`` (Morton), ``hilbert``. Returns a fresh int64 array.
    """
    return _curve_cached(method, int(h), int(w)).copy()


def _dilated(method: str, h: int, w: int, rate: int) -> np.ndarray:
    """``method``'s order on each of the ``rate x rate`` interleaved sub-grids, one after another.

    Sub-grid ``(py, px)`` holds the pixels ``(py + rate*i, px + rate*j)``; sub-grids are visited
    in row-major order of ``(py, px)``, each along ``method``'s curve, so consecutive tokens of a
    sub-grid lie ``rate`` pixels apart. ``rate=1`` is ``method`` itself.
    """
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    parts = []
    for py in range(min(rate, h)):
        for px in range(min(rate, w)):
            sub = grid[py::rate, px::rate]
            parts.append(sub.reshape(-1)[_curve_cached(method, *sub.shape)])
    return np.concatenate(parts)


def dilated_order(method: str, h: int, w: int, rate: int) -> np.ndarray:
    """Row-major flat indices of an ``h x w`` grid in ``method``'s order dilated by ``rate``
    (see :func:`_dilated`); ``rate`` must be a positive integer smaller than ``max(h, w)``."""
    _check_rate(rate, h, w)
    return _dilated(method, int(h), int(w), int(rate))


def _check_rate(rate: int, h: int, w: int) -> None:
    if not isinstance(rate, int | np.integer) or rate < 1 or (rate > 1 and rate >= max(h, w)):
        raise ValueError(
            f"dilation rate {rate!r} must be a positive integer smaller than the {h}x{w} map it scans"
        )


def _base_grids(h: int, w: int) -> list[np.ndarray]:
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    rot = np.rot90(grid, 1)
    return [grid, grid.T, rot, rot.T]


@lru_cache(maxsize=256)
def _directions_cached(method: str, h: int, w: int, num_directions: int, dilation: int = 1) -> np.ndarray:
    if num_directions not in NUM_DIRECTIONS:
        raise ValueError(f"num_directions must be one of {NUM_DIRECTIONS}, got {num_directions}")
    if method not in _CURVES:
        raise ValueError(f"unknown scan method {method!r}; expected one of {SCAN_METHODS}")
    _check_rate(dilation, h, w)
    half = num_directions // 2
    forward = [g.reshape(-1)[_dilated(method, *g.shape, dilation)] for g in _base_grids(h, w)[:half]]
    perms = np.stack(forward + [p[::-1] for p in forward]).astype(np.int64)
    perms.setflags(write=False)
    return perms


def direction_permutations(
    method: str, h: int, w: int, num_directions: int, dilation: int = 1
) -> torch.Tensor:
    """LongTensor [K, h*w]: row k, position j holds the flat pixel index visited at step j.

    Rows 0..K/2-1 are the base directions (identity, transpose, rot90, rot90 + transpose,
    in that order, as many as needed); rows K/2..K-1 are the same sequences reversed. With
    ``dilation`` r > 1 each view is read in the dilated order of :func:`dilated_order`.
    """
    _check_rate(dilation, h, w)
    table = _directions_cached(method, int(h), int(w), int(num_directions), int(dilation))
    return torch.from_numpy(table.copy())


@dataclass(frozen=True)
class ScanOptions:
    """The ``model.scan`` config section, which travels whole to every :class:`SS2D`: scan curve(s),
    number of directions, selective-scan backend (resolved by :mod:`model.ops.selective_scan`),
    and ``grouped`` (each of K channel groups scanned in one direction only; see SS2D)."""

    method: str = "hilbert"
    directions: int = 8
    backend: str = "auto"
    grouped: bool = False

    @property
    def groups(self) -> int:
        """Channel groups G of a scan: K when ``grouped``, else 1."""
        return self.directions if self.grouped else 1


def split_scan_method(method: str, num_directions: int) -> list[tuple[str, int]]:
    """``[(curve, directions), ...]`` of a scan method, single (``"hilbert"``) or hybrid.

    A hybrid such as ``"zigzag+hilbert"`` (paper Table 3, rows 8-12) shares the K directions
    equally among its curves: ``"zigzag+hilbert"`` with K = 8 is 4 zigzag + 4 Hilbert
    directions, ``"scan+zorder+zigzag+hilbert"`` 2 of each.
    """
    parts = [p.strip() for p in str(method).split("+")]
    bad = [p for p in parts if p not in SCAN_METHODS]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(
            f"model.scan.method must be one of {SCAN_METHODS} or distinct ones joined by '+' "
            f"(e.g. 'zigzag+hilbert'), got {method!r}"
        )
    if num_directions not in NUM_DIRECTIONS:
        raise ValueError(f"model.scan.directions must be one of {NUM_DIRECTIONS}, got {num_directions}")
    per = num_directions // len(parts)
    if per * len(parts) != num_directions or per not in NUM_DIRECTIONS:
        raise ValueError(
            f"model.scan.method={method!r} splits model.scan.directions={num_directions} into "
            f"{len(parts)} equal shares of 2, 4 or 8; use e.g. 8 directions for up to 4 curves"
        )
    return [(p, per) for p in parts]


def group_order(num_directions: int, groups: int) -> list[int]:
    """Direction order that makes each channel group's directions contiguous.

    Group ``g`` of ``groups`` takes directions ``g, g + groups, g + 2*groups, ...``, so every
    group mixes base and reversed directions (and, for hybrids, the curves); the identity for
    ``groups`` 1 or K.
    """
    if groups < 1 or num_directions % groups:
        raise ValueError(f"{groups} channel groups do not divide {num_directions} scan directions")
    return [k for g in range(groups) for k in range(g, num_directions, groups)]


@lru_cache(maxsize=64)
def _cached_permutations(
    method: str, h: int, w: int, num_directions: int, dilation: int = 1, groups: int = 1
) -> torch.Tensor:
    """CPU permutation table ``[K, L]``, computed once per (method, size, K, dilation, groups) for
    all SS2D modules; rows in :func:`group_order`."""
    parts = split_scan_method(method, num_directions)
    tables = [direction_permutations(m, h, w, k, dilation) for m, k in parts]
    table = torch.cat(tables).to(torch.long)[group_order(num_directions, groups)]
    check_orders(table)  # built once per (method, size, K, dilation, groups): checked once
    return table


class ScanIndex(nn.Module):
    """Scan order of one SS2D.

    ``index_flat`` / ``index_flat_inv`` ([1, 1, L], persistent) are the base curve order at
    the construction size and its inverse, exactly as the official checkpoints store them;
    forward uses the ``[K, L]`` direction table ``perms`` (non-persistent), rebuilt and
    cached for any other input size.
    """

    def __init__(
        self, method: str, size: int | Sequence[int], num_directions: int, dilation: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.method = method
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.num_directions = int(num_directions)
        self.dilation = dilation
        self.groups = groups
        perms = _cached_permutations(method, *self.size, self.num_directions, dilation, groups)
        perms = perms.clone()
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("index_flat", perms[0].reshape(1, 1, -1).clone())
        self.register_buffer("index_flat_inv", torch.argsort(perms[0]).reshape(1, 1, -1))
        self._other_sizes: dict[tuple[int, int, str], torch.Tensor] = {}

    def permutations(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Direction table ``[K, h*w]`` on ``device`` for an ``h x w`` input."""
        if (h, w) == self.size and self.perms.device == device:
            return self.perms
        key = (h, w, str(device))
        if key not in self._other_sizes:
            table = _cached_permutations(self.method, h, w, self.num_directions, self.dilation, self.groups)
            self._other_sizes[key] = table.to(device)
        return self._other_sizes[key]

    def matches_index(self) -> bool:
        """Whether the stored ``index_flat``/``index_flat_inv`` (e.g. from a checkpoint) match ``perms``."""
        base = self.perms[0].to(self.index_flat.device)
        inv = torch.argsort(base)
        return bool(
            self.index_flat.numel() == base.numel()
            and torch.equal(self.index_flat.reshape(-1), base)
            and torch.equal(self.index_flat_inv.reshape(-1), inv)
        )

    def extra_repr(self) -> str:
        extra = (f", dilation={self.dilation}" if self.dilation != 1 else "") + (
            f", groups={self.groups}" if self.groups != 1 else ""
        )
        h, w = self.size
        size = h if h == w else f"{h}x{w}"
        return f"method={self.method}, size={size}, num_directions={self.num_directions}{extra}"
