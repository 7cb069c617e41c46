"""Mamba decoder of MambaAD ("MambaUPNet"): LSS stages of HSS blocks with hybrid scans.

Module and parameter names follow the authors' ADer checkpoints
(``net_s.layers_up.{i}.blocks.{j}.smm_blocks.{m}.self_attention.*``, ``conv1b3`` ...)
so their state dicts load strictly. Everything runs channels-last inside a stage.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from model.input_size import input_hw
from model.ops.selective_scan import resolve_backend, selective_scan_fn
from model.scan import direction_permutations, inverse_permutations, scan_decode, scan_encode
from util.precision import at_least_float32

T = TypeVar("T")

SCAN_METHODS = ("sweep", "scan", "zorder", "zigzag", "hilbert")
NUM_DIRECTIONS = (2, 4, 8)


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
            f"scan_method (model.scan.method) must be one of {SCAN_METHODS} or distinct ones joined by '+' "
            f"(e.g. 'zigzag+hilbert'), got {method!r}"
        )
    if num_directions not in NUM_DIRECTIONS:
        raise ValueError(f"num_directions must be one of {NUM_DIRECTIONS}, got {num_directions}")
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
    return torch.cat(tables).to(torch.long)[group_order(num_directions, groups)]


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


class PatchExpand2D(nn.Module):
    """Channels-last 2x upsampling: Linear(2C -> 4C) then pixel-shuffle to C channels, LayerNorm."""

    def __init__(self, dim: int, dim_scale: int = 2) -> None:
        super().__init__()
        self.dim_scale = dim_scale
        self.expand = nn.Linear(2 * dim, 2 * dim * dim_scale, bias=False)
        self.norm = nn.LayerNorm(2 * dim // dim_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 2*dim] -> [B, 2H, 2W, dim]``."""
        b, h, w, c = x.shape
        s = self.dim_scale
        x = self.expand(x).reshape(b, h, w, s, s, c // s)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c // s)
        return self.norm(x)


class SS2D(nn.Module):
    """2-D selective-scan mixer: K-direction hybrid scan around a Mamba S6 scan.

    The per-direction projections are stacked parameters (``x_proj_weight [K, R+2N, D]``,
    ``dt_projs_weight [K, D, R]``, ``dt_projs_bias [K, D]``) and the S6 state matrices are
    merged over directions (``A_logs [K*D, N]``, ``Ds [K*D]``), as in the official code.

    ``scan_groups`` G > 1 (``model.scan.grouped``: G = K, our design after MMAD's "group
    scanning"): the D channels are split into G groups of D/G and each group is scanned only
    along its K/G directions (:func:`group_order`), so scan work and memory drop G times while
    all K directions still see the image; the per-direction parameters then have D/G channels.
    ``dilation`` r > 1 reads every direction in the dilated order of :func:`model.scan.dilated_order`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        size: int | Sequence[int] = 8,
        scan_method: str = "hilbert",
        num_directions: int = 8,
        scan_backend: str = "auto",
        scan_groups: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        split_scan_method(scan_method, num_directions)
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.num_directions = num_directions
        self.scan_backend = scan_backend
        group_order(num_directions, scan_groups)
        if self.d_inner % scan_groups:
            raise ValueError(
                f"model.scan.grouped: {self.d_inner} channels cannot be split into {scan_groups} groups"
            )
        self.scan_groups = scan_groups
        k, d, r, n = num_directions, self.d_inner // scan_groups, self.dt_rank, d_state

        d_all = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_all, bias=False)
        self.conv2d = nn.Conv2d(
            d_all, d_all, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_all, bias=True
        )

        bound = 1.0 / math.sqrt(d)
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d).uniform_(-bound, bound))
        dt_std = dt_scale * r**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r).uniform_(-dt_std, dt_std))
        log_dt = torch.rand(k, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * d, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(k * d))
        self.Ds._no_weight_decay = True

        self.out_norm = nn.LayerNorm(d_all)
        self.out_proj = nn.Linear(d_all, d_model, bias=False)
        self.scans = ScanIndex(scan_method, size, num_directions, dilation=dilation, groups=scan_groups)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D, H, W]`` -> summed directional scan outputs ``[B, D, H*W]`` (fp32).

        With the ``triton`` or ``cpu`` backend (named, or what ``auto`` resolves to) the
        directions are fused into the kernels (:meth:`_forward_core_fused`,
        :meth:`_forward_core_channels_last`); otherwise the input is gathered into the K scan
        orders, scanned and scattered back.
        """
        b, d, h, w = x.shape
        k, length, groups = self.num_directions, h * w, self.scan_groups
        perms = self.scans.permutations(h, w, x.device)
        backend = resolve_backend(self.scan_backend, x.device)
        if backend == "triton" and groups in (1, k):
            return self._forward_core_fused(x.reshape(b, d, length), perms)
        if backend == "cpu" and groups in (1, k):
            return self._forward_core_channels_last(x.reshape(b, d, length), perms)
        if groups > 1:
            return self._forward_core_grouped(x.reshape(b, d, length), perms)
        return scan_decode(self._scan_sequences(scan_encode(x, perms)), perms, h, w)

    def _s6_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A = -exp(A_log) [K*d, N]``, ``D [K*d]`` and the delta bias ``[K*d]``, in fp32 or wider."""
        return (
            -torch.exp(at_least_float32(self.A_logs)),
            at_least_float32(self.Ds),
            at_least_float32(self.dt_projs_bias).reshape(-1),
        )

    def _scan_sequences(self, xs: torch.Tensor) -> torch.Tensor:
        """Project each direction's sequences ``xs [B, K, d, L]`` (already in scan order) with its
        own weights and run the selective scan: ``[B, K, d, L]`` fp32 (or float64), still in scan order."""
        b, k, d, length = xs.shape
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        A, D, bias = self._s6_parameters()
        out = selective_scan_fn(
            at_least_float32(xs).reshape(b, k * d, length),
            at_least_float32(dts).reshape(b, k * d, length),
            A,
            at_least_float32(bs).contiguous(),
            at_least_float32(cs).contiguous(),
            D=D,
            delta_bias=bias,
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return out.view(b, k, d, length)

    def _forward_core_fused(self, x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_core` of ``x [B, D, L]`` by :func:`cross_scan_triton`, all in pixel order.

        The projections act on each position alone, so they are computed in pixel order and
        the kernels read each direction's order through ``perms``: the input is never gathered
        into the K scan orders (a ``[B, K, D, L]`` copy kept for backward), nor the output and
        the gradients scattered back.
        """
        from model.ops.selective_scan_triton import cross_scan_triton

        grouped = self.scan_groups > 1
        if grouped:  # one direction per group: direction k projects its own channels
            b, _, length = x.shape
            x_dbl = torch.einsum(
                "bkdl,kcd->bkcl", x.view(b, self.num_directions, -1, length), self.x_proj_weight
            )
        else:
            x_dbl = torch.einsum("bdl,kcd->bkcl", x, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        A, D, bias = self._s6_parameters()
        args = (x.float(), dts.float(), A, bs.float(), cs.float(), D, bias, perms)
        return cross_scan_triton(*args, delta_softplus=True, grouped=grouped)

    def _forward_core_channels_last(self, x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_core` of ``x [B, D, L]`` by :func:`cross_scan_cpu_channels_last`.

        Like :meth:`_forward_core_fused`, in pixel order, but channels-last (the CPU kernels'
        layout): the input projection is one matrix product of ``[B*L, D]`` rows (grouped: with
        a block-diagonal weight), the per-direction delta projection a batched product giving
        ``delta`` direction-major ``[K, B, L, d]``, and the result comes back as a view of
        ``[B, L, D]``.
        """
        from model.ops.selective_scan_cpu import cross_scan_cpu_channels_last

        b, _, length = x.shape
        k, rank, n = self.num_directions, self.dt_rank, self.d_state
        grouped = self.scan_groups > 1
        rows = x.transpose(1, 2).contiguous()  # [B, L, D]
        if grouped:  # direction k projects its own channels
            x_weight = torch.block_diag(*self.x_proj_weight.transpose(1, 2))
        else:
            x_weight = self.x_proj_weight.reshape(-1, x.shape[1]).t()
        x_dbl = (rows @ x_weight).view(b, length, k, rank + 2 * n)
        dts, bs, cs = torch.split(x_dbl, [rank, n, n], dim=3)
        dts = dts.permute(2, 0, 1, 3).reshape(k, b * length, rank)  # small: rank channels
        delta = torch.bmm(dts, self.dt_projs_weight.transpose(1, 2)).view(k, b, length, -1)
        A, D, bias = self._s6_parameters()
        args = (rows.float(), delta.float(), A, bs.float(), cs.float(), D, bias, perms)
        return cross_scan_cpu_channels_last(*args, delta_softplus=True, grouped=grouped).transpose(1, 2)

    def _forward_core_grouped(self, x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_core` of ``x [B, D, L]`` with channel groups (``scan_groups`` G).

        Direction slot ``k`` of ``perms`` (in :func:`group_order`) belongs to group
        ``k // (K/G)`` and reads only that group's D/G channels; each group's output is the sum
        of its directions' outputs, un-permuted. With G = 1 this is the plain K-direction scan.
        """
        b, d, length = x.shape
        k, groups = self.num_directions, self.scan_groups
        per, dk = k // groups, d // groups
        xg = x.view(b, groups, 1, dk, length).expand(b, groups, per, dk, length).reshape(b, k, dk, length)
        index = perms.view(1, k, 1, length).expand(b, k, dk, length)
        out = self._scan_sequences(torch.gather(xg, 3, index))
        inv = inverse_permutations(perms).view(1, k, 1, length).expand(b, k, dk, length)
        y = torch.gather(out, 3, inv)
        return y.view(b, groups, per, dk, length).sum(2).reshape(b, d, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last ``[B, H, W, C] -> [B, H, W, C]``."""
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_core(x).transpose(1, 2).reshape(b, h, w, self.d_inner)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)


class HSSBlock(nn.Module):
    """Hybrid State Space block: ``x + DropPath(SS2D(LayerNorm(x)))``, channels-last."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, **ss2d_kwargs: object) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = SS2D(d_model=hidden_dim, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


DEFAULT_KERNELS = (5, 7)


@dataclass(frozen=True)
class ScanOptions:
    """The ``model.scan`` config section: scan curve(s), number of directions, selective-scan
    backend, and ``grouped`` (each of K channel groups scanned in one direction only; see SS2D)."""

    method: str = "hilbert"
    directions: int = 8
    backend: str = "auto"
    grouped: bool = False


@dataclass(frozen=True)
class LSSOptions:
    """The ``model.lss`` config section (paper Table 4): HSS blocks per LSS module, local branches."""

    blocks: int | None = None
    kernels: tuple[int, ...] = DEFAULT_KERNELS
    pointwise: bool = True
    residual: bool = True


def options(kind: type[T], value: T | Mapping[str, Any] | None) -> T:
    """``value`` as the options dataclass ``kind``: a config section's dict, an instance, or None."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} key(s) {unknown}; valid: {', '.join(sorted(names))}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def _conv_in_silu(dim: int, kernel_size: int = 1, depthwise: bool = False) -> nn.Sequential:
    """Conv (1x1 with bias, or depth-wise k x k without bias) + InstanceNorm2d + SiLU."""
    if depthwise:
        conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
    else:
        conv = nn.Conv2d(dim, dim, 1)
    return nn.Sequential(conv, nn.InstanceNorm2d(dim), nn.SiLU())


def _check_kernels(kernels: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in kernels)
    if not ks or len(set(ks)) != len(ks) or any(k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(
            "model.lss.kernels must be distinct odd sizes such as [5, 7] or [1, 3, 5, 7], "
            f"got {list(kernels)}"
        )
    return tuple(sorted(ks))


class LSSModule(nn.Module):
    """Locality-enhanced State Space module: HSS cascade + parallel depth-wise local branches.

    ``out = finalconv11(cat(HSS^M(x), local_k1(x), local_k2(x), ...)) + x`` where each local
    branch is ``1x1 conv -> k x k depth-wise conv -> 1x1 conv`` (each with InstanceNorm2d +
    SiLU). The paper default (``kernels=(5, 7)``) keeps the ADer names: ``conv1b3``/``conv1a3``
    wrap the 7x7 branch and ``conv33`` exists, unused in forward, only so the authors'
    checkpoints load strictly. Table 4 variants (other kernel sets, ``pointwise=False`` for
    depth-wise convs alone, ``residual=False``) name branch ``k`` ``conv1b{k}``/``conv{k}{k}``/
    ``conv1a{k}`` and have no ``conv33``.
    """

    def __init__(
        self,
        hidden_dim: int,
        depth: int = 2,
        drop_path: float = 0.0,
        kernels: Sequence[int] = DEFAULT_KERNELS,
        pointwise: bool = True,
        residual: bool = True,
        **ss2d_kwargs: object,
    ) -> None:
        super().__init__()
        self.kernels = _check_kernels(kernels)
        self.pointwise = bool(pointwise)
        self.residual = bool(residual)
        self.smm_blocks = nn.ModuleList(
            HSSBlock(hidden_dim, drop_path=drop_path, **ss2d_kwargs) for _ in range(depth)
        )
        self.official_layout = self.kernels == DEFAULT_KERNELS
        # Creation order of the default layout is the official one (same init for a given seed).
        if self.official_layout:
            if self.pointwise:
                self.conv1b3 = _conv_in_silu(hidden_dim)
                self.conv1a3 = _conv_in_silu(hidden_dim)
                self.conv1b5 = _conv_in_silu(hidden_dim)
                self.conv1a5 = _conv_in_silu(hidden_dim)
                self.conv33 = _conv_in_silu(hidden_dim, 3, depthwise=True)
            self.conv55 = _conv_in_silu(hidden_dim, 5, depthwise=True)
            self.conv77 = _conv_in_silu(hidden_dim, 7, depthwise=True)
        else:
            for k in self.kernels:
                if self.pointwise:
                    setattr(self, f"conv1b{k}", _conv_in_silu(hidden_dim))
                    setattr(self, f"conv1a{k}", _conv_in_silu(hidden_dim))
                setattr(self, f"conv{k}{k}", _conv_in_silu(hidden_dim, k, depthwise=True))
        self.finalconv11 = nn.Conv2d((1 + len(self.kernels)) * hidden_dim, hidden_dim, kernel_size=1)
        self.apply(self._init_conv)

    @staticmethod
    def _init_conv(m: nn.Module) -> None:
        """Official init of every Conv2d in the module (SS2D's depth-wise conv included)."""
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def branch_names(self, k: int) -> tuple[str | None, str, str | None]:
        """Attribute names ``(before, depth-wise, after)`` of the local branch of kernel ``k``."""
        wrap = 3 if self.official_layout and k == 7 else k
        if not self.pointwise:
            return None, f"conv{k}{k}", None
        return f"conv1b{wrap}", f"conv{k}{k}", f"conv1a{wrap}"

    def _local(self, xc: torch.Tensor, k: int) -> torch.Tensor:
        before, dw, after = self.branch_names(k)
        if before is not None:
            xc = getattr(self, before)(xc)
        xc = getattr(self, dw)(xc)
        return getattr(self, after)(xc) if after is not None else xc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last ``[B, H, W, C] -> [B, H, W, C]``."""
        glob = x
        for blk in self.smm_blocks:
            glob = blk(glob)
        xc = x.permute(0, 3, 1, 2).contiguous()
        locals_ = [self._local(xc, k) for k in self.kernels]
        out = self.finalconv11(torch.cat((glob.permute(0, 3, 1, 2), *locals_), dim=1)).permute(0, 2, 3, 1)
        return out + x if self.residual else out


def lss_layout(depth: int, blocks: int | None = None) -> tuple[int, int]:
    """``(number of LSS modules, HSS blocks per module)`` for a stage of ``depth`` HSS blocks.

    ``blocks=None`` is the paper's rule (3 per module if ``depth % 3 == 0``, else 2);
    an explicit ``blocks`` (Table 4's M) must divide ``depth``.
    """
    if blocks is not None:
        if blocks < 1 or depth < 1 or depth % blocks:
            raise ValueError(
                f"decoder stage depth {depth} is not a positive multiple of model.lss.blocks={blocks}; "
                "choose model.depths whose entries it divides, or model.lss.blocks=None"
            )
        return depth // blocks, blocks
    if depth > 0 and depth % 3 == 0:
        return depth // 3, 3
    if depth > 0 and depth % 2 == 0:
        return depth // 2, 2
    raise ValueError(f"decoder stage depth must be a positive multiple of 2 or 3, got {depth}")


def drop_path_schedule(
    depths: Sequence[int], drop_path_rate: float, blocks: int | None = None
) -> list[list[float]]:
    """Per stage, the drop-path rate of each LSS module (shared by its HSS blocks).

    Rates are ``linspace(0, rate, sum(depths))`` reversed and sliced per stage; the official
    code then gives LSS module ``j`` the ``j``-th entry of its stage's slice (not the entry of
    its first HSS block) -- reproduced here on purpose.
    """
    dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()[::-1]
    out = []
    for i, depth in enumerate(depths):
        n_modules, _ = lss_layout(depth, blocks)
        start = sum(depths[:i])
        out.append(dpr[start : start + depth][:n_modules])
    return out


class LSSLayer(nn.Module):
    """One decoder stage: optional PatchExpand2D (``upsample``) then LSS modules (``blocks``)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        drop_paths: Sequence[float],
        upsample: bool,
        lss_blocks: int | None = None,
        **lss_kwargs: object,
    ) -> None:
        super().__init__()
        n_modules, per_module = lss_layout(depth, lss_blocks)
        self.blocks = nn.ModuleList(
            LSSModule(dim, depth=per_module, drop_path=drop_paths[j], **lss_kwargs) for j in range(n_modules)
        )
        self.upsample = PatchExpand2D(dim) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class MambaDecoder(nn.Module):
    """Student decoder: 4 LSS stages halving channels and doubling resolution.

    ``forward([B, dims[0], h, w])`` returns the outputs of stages 1..3, largest first, as
    ``[B, C, H, W]`` maps (``dims[3]`` at ``8h``, ``dims[2]`` at ``4h``, ``dims[1]`` at ``2h``).
    ``image_size`` only fixes the size of the stored ``index_flat`` buffers (stage ``i`` is
    built for ``image_size / 32 * 2**i``); forward adapts to the actual input size.
    ``scan`` (:class:`ScanOptions`) and ``lss`` (:class:`LSSOptions`, paper Table 4; see
    :class:`LSSModule`, :func:`lss_layout`) are the ``model.scan`` / ``model.lss`` config sections.
    """

    def __init__(
        self,
        dims: Sequence[int] = (512, 256, 128, 64),
        depths: Sequence[int] = (3, 4, 6, 3),
        d_state: int = 16,
        drop_path: float = 0.2,
        scan: ScanOptions | Mapping[str, Any] | None = None,
        lss: LSSOptions | Mapping[str, Any] | None = None,
        image_size: int | Sequence[int] = 256,
    ) -> None:
        super().__init__()
        scan, lss = options(ScanOptions, scan), options(LSSOptions, lss)
        dims, depths = [int(c) for c in dims], [int(d) for d in depths]
        if len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must have the same length")
        for prev, cur in itertools.pairwise(dims):
            if prev != 2 * cur:
                raise ValueError(f"each decoder stage must halve the channels, got dims {dims}")
        h, w = input_hw(image_size)
        self.dims, self.depths = dims, depths
        schedule = drop_path_schedule(depths, drop_path, lss.blocks)
        self.layers_up = nn.ModuleList(
            LSSLayer(
                dim,
                depth,
                drop_paths=schedule[i],
                upsample=i != 0,
                d_state=d_state,
                size=(h // 32 * 2**i, w // 32 * 2**i),
                scan_method=scan.method,
                num_directions=scan.directions,
                scan_backend=scan.backend,
                scan_groups=scan.directions if scan.grouped else 1,
                lss_blocks=lss.blocks,
                kernels=lss.kernels,
                pointwise=lss.pointwise,
                residual=lss.residual,
            )
            for i, (dim, depth) in enumerate(zip(dims, depths))
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: truncated-normal (std .02) Linear weights, zero biases, LayerNorm 1/0."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.permute(0, 2, 3, 1)
        outs: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers_up):
            x = layer(x)
            if i != 0:
                outs.insert(0, x.permute(0, 3, 1, 2).contiguous())
        return outs
