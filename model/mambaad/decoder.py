"""Mamba decoder of MambaAD ("MambaUPNet"): LSS stages of HSS blocks with hybrid scans.

Module and parameter names follow the authors' ADer checkpoints
(``net_s.layers_up.{i}.blocks.{j}.smm_blocks.{m}.self_attention.*``, ``conv1b3`` ...)
so their state dicts load strictly. Everything runs channels-last inside a stage.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from model.input_size import input_hw
from model.mambaad.scan_orders import ScanOptions
from model.mambaad.ss2d import HSSBlock
from util.config import options


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


DEFAULT_KERNELS = (5, 7)


@dataclass(frozen=True)
class LSSOptions:
    """The ``model.lss`` config section (paper Table 4): HSS blocks per LSS module, local branches."""

    blocks: int | None = None
    kernels: tuple[int, ...] = DEFAULT_KERNELS
    pointwise: bool = True
    residual: bool = True


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
        d_state: int = 16,
        size: int | Sequence[int] = 8,
        scan: ScanOptions | None = None,
    ) -> None:
        super().__init__()
        self.kernels = _check_kernels(kernels)
        self.pointwise = bool(pointwise)
        self.residual = bool(residual)
        self.smm_blocks = nn.ModuleList(
            HSSBlock(hidden_dim, drop_path=drop_path, d_state=d_state, size=size, scan=scan)
            for _ in range(depth)
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
        lss: LSSOptions,
        d_state: int,
        size: int | Sequence[int],
        scan: ScanOptions,
    ) -> None:
        super().__init__()
        n_modules, per_module = lss_layout(depth, lss.blocks)
        self.blocks = nn.ModuleList(
            LSSModule(
                dim,
                depth=per_module,
                drop_path=drop_paths[j],
                kernels=lss.kernels,
                pointwise=lss.pointwise,
                residual=lss.residual,
                d_state=d_state,
                size=size,
                scan=scan,
            )
            for j in range(n_modules)
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
                lss=lss,
                d_state=d_state,
                size=(h // 32 * 2**i, w // 32 * 2**i),
                scan=scan,
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
