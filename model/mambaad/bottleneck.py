"""Bottlenecks between the teacher and the decoder: the ``model.bottleneck`` config section.

``hfpn`` is the paper's Half-FPN (:class:`model.mambaad.hfpn.HalfFPN`, the default; official
checkpoints load into it); ``dilated_mamba`` is our dilated Mamba fuser after MMAD's description
(:class:`model.mambaad.fuser.DilatedMambaFuser`). Both turn the teacher's three maps into one
``[B, 2*c2, H/32, W/32]`` map, so the decoder does not depend on the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from model.mambaad.scan_orders import ScanOptions
from util.registry import Registry

BOTTLENECKS = Registry("bottleneck")
BOTTLENECKS.register_lazy("hfpn", "model.mambaad.hfpn:HalfFPN")
BOTTLENECKS.register_lazy("dilated_mamba", "model.mambaad.fuser:DilatedMambaFuser")


@dataclass(frozen=True)
class BottleneckOptions:
    """``type`` (``hfpn`` or ``dilated_mamba``); the other keys configure ``dilated_mamba``:
    its HSS blocks' dilation rates (one block each), scan curve and number of directions."""

    type: str = "hfpn"
    dilations: tuple[int, ...] = (1, 2)
    method: str = "sweep"
    directions: int = 4


def build_bottleneck(
    options: BottleneckOptions,
    in_channels: Sequence[int],
    image_size: int | Sequence[int],
    d_state: int,
    scan_backend: str,
) -> nn.Module:
    """The configured bottleneck for teacher channels ``in_channels``; ``dilated_mamba`` scans with
    the section's ``method`` and ``directions`` and the model's ``scan_backend``."""
    if options.type == "hfpn":
        return BOTTLENECKS.build("hfpn", in_channels)
    return BOTTLENECKS.build(
        options.type,
        in_channels,
        dilations=options.dilations,
        scan=ScanOptions(method=options.method, directions=options.directions, backend=scan_backend),
        d_state=d_state,
        image_size=image_size,
    )
