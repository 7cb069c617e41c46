"""SS2D, the 2-D selective-scan mixer of MambaAD, and its HSS block.

Parameter names follow the authors' ADer checkpoints (``self_attention.x_proj_weight`` ...).
The scan itself runs in :mod:`model.ops.selective_scan`, which picks the backend; SS2D only
lays out the projections the way the chosen route reads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from model.mambaad.scan_orders import ScanIndex, ScanOptions, group_order, split_scan_method
from model.ops.scan_reference import inverse_permutations
from model.ops.selective_scan import CrossScanFn, cross_scan_route, selective_scan_fn
from util.precision import at_least_float32


class SS2D(nn.Module):
    """2-D selective-scan mixer: K-direction hybrid scan around a Mamba S6 scan.

    The per-direction projections are stacked parameters (``x_proj_weight [K, R+2N, D]``,
    ``dt_projs_weight [K, D, R]``, ``dt_projs_bias [K, D]``) and the S6 state matrices are
    merged over directions (``A_logs [K*D, N]``, ``Ds [K*D]``), as in the official code.

    ``scan`` (:class:`ScanOptions`, the ``model.scan`` section) names the curve(s), K and the
    backend. ``scan.grouped`` (G = K channel groups, our design after MMAD's "group
    scanning"): the D channels are split into G groups of D/G and each group is scanned only
    along its K/G directions (:func:`group_order`), so scan work and memory drop G times while
    all K directions still see the image; the per-direction parameters then have D/G channels.
    ``dilation`` r > 1 reads every direction in the dilated order of
    :func:`model.mambaad.scan_orders.dilated_order`.
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
        scan: ScanOptions | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.scan = scan = scan or ScanOptions()
        split_scan_method(scan.method, scan.directions)
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        group_order(scan.directions, scan.groups)
        if self.d_inner % scan.groups:
            raise ValueError(
                f"model.scan.grouped: {self.d_inner} channels cannot be split into {scan.groups} groups"
            )
        k, d, r, n = scan.directions, self.d_inner // scan.groups, self.dt_rank, d_state

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
        self.scans = ScanIndex(scan.method, size, scan.directions, dilation=dilation, groups=scan.groups)

    @property
    def num_directions(self) -> int:
        """K, the number of scan directions."""
        return self.scan.directions

    @property
    def scan_groups(self) -> int:
        """G, the number of channel groups (K when ``scan.grouped``, else 1)."""
        return self.scan.groups

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D, H, W]`` -> summed directional scan outputs ``[B, D, H*W]`` (fp32).

        :func:`model.ops.selective_scan.cross_scan_route` chooses the backend once. When it has a
        fused cross-scan kernel, the directions are fused into it (pixel order, channels-first:
        :meth:`_forward_core_fused`; channels-last: :meth:`_forward_core_channels_last`);
        otherwise the input is read into the K scan orders with the route's ``encode``, scanned
        and scattered back with its ``decode``.
        """
        b, d, h, w = x.shape
        length = h * w
        perms = self.scans.permutations(h, w, x.device)
        route = cross_scan_route(self.scan.backend, x.device)
        if route.fused is not None:
            if route.channels_last:
                return self._forward_core_channels_last(route.fused, x.reshape(b, d, length), perms)
            return self._forward_core_fused(route.fused, x.reshape(b, d, length), perms)
        if self.scan_groups > 1:
            return self._forward_core_grouped(route.backend, x.reshape(b, d, length), perms)
        return route.decode(self._scan_sequences(route.encode(x, perms), route.backend), perms, h, w)

    def _s6_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A = -exp(A_log) [K*d, N]``, ``D [K*d]`` and the delta bias ``[K*d]``, in fp32 or wider."""
        return (
            -torch.exp(at_least_float32(self.A_logs)),
            at_least_float32(self.Ds),
            at_least_float32(self.dt_projs_bias).reshape(-1),
        )

    def _scan_sequences(self, xs: torch.Tensor, backend: str) -> torch.Tensor:
        """Project each direction's sequences ``xs [B, K, d, L]`` (already in scan order) with its
        own weights and run the selective scan with the resolved ``backend``: ``[B, K, d, L]``
        fp32 (or float64), still in scan order."""
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
            backend=backend,
        )
        return out.view(b, k, d, length)

    def _forward_core_fused(
        self, cross_scan: CrossScanFn, x: torch.Tensor, perms: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_core` of ``x [B, D, L]`` by a fused channels-first ``cross_scan`` (Triton),
        all in pixel order.

        The projections act on each position alone, so they are computed in pixel order and
        the kernels read each direction's order through ``perms``: the input is never gathered
        into the K scan orders (a ``[B, K, D, L]`` copy kept for backward), nor the output and
        the gradients scattered back.
        """
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
        return cross_scan(*args, delta_softplus=True, grouped=grouped)

    def _forward_core_channels_last(
        self, cross_scan: CrossScanFn, x: torch.Tensor, perms: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_core` of ``x [B, D, L]`` by a fused channels-last ``cross_scan`` (Numba).

        Like :meth:`_forward_core_fused`, in pixel order, but channels-last (the CPU kernels'
        layout): the input projection is one matrix product of ``[B*L, D]`` rows (grouped: with
        a block-diagonal weight), the per-direction delta projection a batched product giving
        ``delta`` direction-major ``[K, B, L, d]``, and the result comes back as a view of
        ``[B, L, D]``.
        """
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
        return cross_scan(*args, delta_softplus=True, grouped=grouped).transpose(1, 2)

    def _forward_core_grouped(self, backend: str, x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
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
        out = self._scan_sequences(torch.gather(xg, 3, index), backend)
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

    def __init__(
        self,
        hidden_dim: int,
        drop_path: float = 0.0,
        d_state: int = 16,
        size: int | Sequence[int] = 8,
        scan: ScanOptions | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = SS2D(
            d_model=hidden_dim, d_state=d_state, size=size, scan=scan, dilation=dilation
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))
