# ruff: noqa: N803  (A, B, C, D are the standard names of the S6 parameters, as in mamba-ssm)
"""The selective scan's definition and argument checks, which every backend shares.

``selective_scan_ref`` (a step-by-step loop, the tests' oracle) and ``selective_scan_chunked``
(an exact pure-PyTorch parallel scan, CPU or GPU) compute the scan written in
:mod:`model.ops.selective_scan`; ``check_scan_args`` and ``check_cross_scan_args`` are the one
shape check of the plain and the fused cross-scan. Float32 and float64 inputs keep their
precision, 16-bit ones are computed in float32. ``scan_encode`` / ``scan_decode`` define the
cross-scan around it: read a map along K direction permutations, and undo them and sum; a
fused cross-scan kernel computes ``scan_decode(scan(scan_encode(x)))`` without the gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from util.precision import at_least_float32

_denormals_flushed = False


def flush_denormals_on_cpu() -> None:
    """Make CPU float math flush denormals to zero (process-wide, once).

    Decays ``exp(delta * A)`` multiplied step after step underflow into denormal floats,
    which x86 CPUs process 10-100x slower (measured here: a 64x64 training step went from
    80 s to a few seconds). Values that small lie far below the fp32 resolution of any
    output, so results do not change measurably.
    """
    global _denormals_flushed
    if not _denormals_flushed:
        torch.set_flush_denormal(True)
        _denormals_flushed = True


def prepare_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """fp32 (float64 stays float64), time-major views: u, delta [L, b, K, d]; A [K, d, N];
    B [L, b, K, 1, N]; C [L, b, K, N, 1].

    Time-major layout makes every time step (and every run of steps) one contiguous block.
    """
    b, channels, length = u.shape
    groups = B.shape[1]
    u = at_least_float32(u)
    delta = at_least_float32(delta)
    if delta_bias is not None:
        delta = delta + at_least_float32(delta_bias)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    u_t = u.permute(2, 0, 1).reshape(length, b, groups, -1)
    delta_t = delta.permute(2, 0, 1).reshape(length, b, groups, -1)
    A = at_least_float32(A).view(groups, channels // groups, -1)
    B_t = at_least_float32(B).permute(3, 0, 1, 2).unsqueeze(3)
    C_t = at_least_float32(C).permute(3, 0, 1, 2).unsqueeze(4)
    return u_t, delta_t, A, B_t, C_t


def finish_outputs(y_t, u_t, D):
    """Add the skip term and return to [b, K*d, L]."""
    if D is not None:
        y_t = y_t + at_least_float32(D).view(u_t.shape[2:]) * u_t
    return y_t.flatten(2).permute(1, 2, 0).contiguous()


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """Definition: a loop over time, vectorised over batch, channels and states."""
    u_t, delta_t, A, B_t, C_t = prepare_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus)
    dA = torch.exp(delta_t[..., None] * A)  # [L, b, K, d, N]
    dBu = (delta_t * u_t)[..., None] * B_t
    h = torch.zeros_like(dA[0])
    states = []
    # unbind (not dA[t]) so that backward stacks the per-step grads once instead of
    # materialising a full-size zero tensor for every step.
    for dA_t, dBu_t in zip(dA.unbind(0), dBu.unbind(0)):
        h = torch.addcmul(dBu_t, dA_t, h)
        states.append(h)
    y_t = torch.matmul(torch.stack(states), C_t).squeeze(-1)
    return finish_outputs(y_t, u_t, D)


# Decay factors below 2**-60 are set to zero: their contribution is far below fp32 resolution,
# and it keeps every product of two decays a normal float (denormal arithmetic is ~100x slower
# on x86 CPUs, and the pairwise products of an odd-even scan would otherwise underflow there).
_TINY = 2.0**-60


def _flush_tiny(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a < _TINY, 0.0, a)


def _linear_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t along dim 0 with h_{-1} = 0, by odd-even reduction.

    Each level pairs neighbours ((a_e, x_e), (a_o, x_o)) -> (a_o*a_e, a_o*x_e + x_o), solves
    the half-length problem for the odd positions and fills in the even ones. Only products
    and sums of the inputs appear, so with 0 <= a <= 1 nothing can overflow; the work is
    O(T) and the number of PyTorch calls O(log T).
    """
    length = a.shape[0]
    if length == 1:
        return x
    if length % 2:
        head = _linear_scan(a[:-1], x[:-1])
        return torch.cat([head, torch.addcmul(x[-1:], a[-1:], head[-1:])])
    a_e, a_o = a.unflatten(0, (-1, 2)).unbind(1)
    x_e, x_o = x.unflatten(0, (-1, 2)).unbind(1)
    h_o = _linear_scan(_flush_tiny(a_o * a_e), torch.addcmul(x_o, a_o, x_e))
    h_before = torch.cat([torch.zeros_like(h_o[:1]), h_o[:-1]])
    h_e = torch.addcmul(x_e, a_e, h_before)
    return torch.stack([h_e, h_o], dim=1).flatten(0, 1)


CHUNK = 32


def selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk=CHUNK):
    """Same result as the reference: an odd-even scan inside chunks of ``chunk`` steps, the
    state carried from chunk to chunk; decay and input terms are built per chunk so the
    working set stays small."""
    u_t, delta_t, A, B_t, C_t = prepare_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus)
    outputs = []
    carry = None
    # split once (not slice per chunk) so backward concatenates the chunk grads in one go.
    pieces = (t.split(chunk) for t in (delta_t, u_t, B_t, C_t))
    for d_c, u_c, b_c, c_c in zip(*pieces):
        a = _flush_tiny(torch.exp(d_c[..., None] * A))
        x = (d_c * u_c)[..., None] * b_c
        if carry is not None:
            x[0].addcmul_(a[0], carry)
        h = _linear_scan(a, x)
        carry = h[-1]
        outputs.append(torch.matmul(h, c_c).squeeze(-1))
    return finish_outputs(torch.cat(outputs), u_t, D)


def check_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the first input whose shape does not fit the others.

    The one shape check of the scan: :func:`selective_scan_fn` runs it before it dispatches, so
    the backends (``selective_scan_cpu``, ``selective_scan_triton``, ``selective_scan_export`` and
    the pure-PyTorch ones) take their inputs as given.
    """
    if u.dim() != 3 or A.dim() != 2 or B.dim() != 4:
        raise ValueError(
            f"selective scan: expected u [b, K*d, L], A [K*d, N], B [b, K, N, L], got u "
            f"{tuple(u.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    if groups == 0 or channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups of B/C")
    expected = {
        "delta": (delta, (batch, channels, length)),
        "A": (A, (channels, n_state)),
        "B": (B, (batch, groups, n_state, length)),
        "C": (C, (batch, groups, n_state, length)),
        "D": (D, (channels,)),
        "delta_bias": (delta_bias, (channels,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective scan: {name} has shape {tuple(tensor.shape)}, expected {shape}")


def check_orders(perms: torch.Tensor) -> None:
    """Each row of the scan-order table ``perms [K, L]`` must visit the ``L`` pixels once each (a
    permutation of ``0..L-1``): the fused kernels neither check their reads nor write a pixel no row
    visits. Checked once per table (again only after an in-place change), so a GPU table costs one
    synchronisation, not one per call."""
    if getattr(perms, "_orders_checked", None) == perms._version:
        return
    length = perms.shape[-1]
    visits = perms.sort(dim=-1).values
    if not torch.equal(visits, torch.arange(length, device=perms.device, dtype=perms.dtype).expand_as(perms)):
        raise ValueError(
            f"cross scan: each row of perms must visit the {length} pixels 0..{length - 1} once each "
            "(a permutation); a row repeats or skips a pixel or indexes outside the image"
        )
    perms._orders_checked = perms._version


def check_cross_scan_args(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    perms: torch.Tensor,
    grouped: bool,
) -> None:
    """Shapes of a fused cross-scan's arguments (``cross_scan_cpu`` / ``cross_scan_triton``):
    ``x [b, d_x, L]``, ``perms [K, L]``, ``delta [b, K, d, L]``, ``A [K*d, N]``, ``B, C [b, K, N,
    L]``, ``D, delta_bias [K*d]`` with ``d = d_x`` (or ``d_x / K`` when ``grouped``), and
    each row of ``perms`` a permutation of ``0..L-1`` (:func:`check_orders`, once per table); a
    ``ValueError`` names the first argument that does not fit."""
    if x.dim() != 3 or delta.dim() != 4 or perms.dim() != 2:
        raise ValueError(
            f"cross scan: expected x [b, d_x, L], delta [b, K, d, L], perms [K, L], got x "
            f"{tuple(x.shape)}, delta {tuple(delta.shape)}, perms {tuple(perms.shape)}"
        )
    batch, d_x, length = x.shape
    groups, n = perms.shape[0], A.shape[-1]
    if grouped and d_x % groups:
        raise ValueError(f"grouped cross scan: {d_x} channels cannot be split into {groups} directions")
    d = d_x // groups if grouped else d_x
    expected = {
        "perms": (perms, (groups, length)),
        "delta": (delta, (batch, groups, d, length)),
        "A": (A, (groups * d, n)),
        "B": (B, (batch, groups, n, length)),
        "C": (C, (batch, groups, n, length)),
        "D": (D, (groups * d,)),
        "delta_bias": (delta_bias, (groups * d,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"cross scan: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    check_orders(perms)


def inverse_permutations(perms: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse: ``inv[k, perms[k, j]] = j``."""
    inv = torch.empty_like(perms)
    positions = torch.arange(perms.shape[-1], device=perms.device, dtype=perms.dtype)
    inv.scatter_(-1, perms, positions.expand_as(perms).contiguous())
    return inv


def scan_encode(x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Read a feature map along every direction: [B, C, H, W] -> [B, K, C, L] (one gather)."""
    b, c = x.shape[:2]
    k, length = perms.shape
    flat = x.reshape(b, 1, c, length).expand(b, k, c, length)
    index = perms.to(x.device).view(1, k, 1, length).expand(b, k, c, length)
    return torch.gather(flat, 3, index)


def scan_decode(y: torch.Tensor, perms: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Undo each direction and sum over them: [B, K, C, L] -> [B, C, H*W]."""
    b, k, c, length = y.shape
    if perms.shape != (k, length) or h * w != length:
        raise ValueError(f"perms {tuple(perms.shape)} / grid {h}x{w} do not match sequences {tuple(y.shape)}")
    inv = inverse_permutations(perms.to(y.device))
    index = inv.view(1, k, 1, length).expand(b, k, c, length)
    return torch.gather(y, 3, index).sum(dim=1)
