"""MambaAD: frozen CNN teacher, Half-FPN bottleneck, Mamba student decoder.

Submodule names (``net_t``, ``mff_oce``, ``net_s``) are the official checkpoint prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.anomaly_map import anomaly_maps_and_scores
from model.base import AnomalyModel
from model.mambaad.bottleneck import BottleneckOptions, build_bottleneck
from model.mambaad.decoder import LSSOptions, MambaDecoder
from model.mambaad.official import load_weights
from model.mambaad.scan_orders import ScanOptions
from model.teacher import TeacherOptions, build_teacher, teacher_options
from util.config import options
from util.precision import at_least_float32

INDEX_BUFFER_NAMES = ("index_flat", "index_flat_inv")


class MambaAD(AnomalyModel):
    """Teacher features ``net_t(x)`` vs. student reconstruction ``net_s(mff_oce(net_t(x)))``.

    The arguments are the ``model.*`` config keys, sections as dicts (or their options classes):
    ``teacher`` (:class:`TeacherOptions`, or just the timm name), ``scan`` (:class:`ScanOptions`),
    ``lss`` (:class:`LSSOptions`, paper Table 4), ``bottleneck`` (:class:`BottleneckOptions`: the
    paper's Half-FPN or our dilated Mamba fuser). The defaults are the paper's model, whose state
    dict matches the authors' ADer checkpoints key for key.
    :meth:`predict` turns the two into anomaly maps (blurred with ``sigma``) and image scores.
    The trainer uses the defaults of :class:`model.base.AnomalyModel` for everything else (the
    config's ``loss`` on ``forward``'s outputs, one AdamW optimiser, one stage).
    """

    frozen_layers = ("net_t",)
    teacher_layer = "net_t"

    def __init__(
        self,
        teacher: str | TeacherOptions | Mapping[str, Any] = "resnet34",
        depths: Sequence[int] = (3, 4, 6, 3),
        scan: ScanOptions | Mapping[str, Any] | None = None,
        d_state: int = 16,
        drop_path: float = 0.2,
        lss: LSSOptions | Mapping[str, Any] | None = None,
        bottleneck: BottleneckOptions | Mapping[str, Any] | None = None,
        sigma: float = 4.0,
        image_size: int | Sequence[int] = 256,
        log: Callable[[str], object] = print,
    ) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.teacher = teacher_options(teacher)
        t = self.teacher
        self.net_t = build_teacher(
            t.name, t.pretrained, t.checkpoint, log=log, from_model_checkpoint=t.from_model_checkpoint
        )
        channels = list(self.net_t.feature_info.channels())
        if len(channels) != 3:
            raise ValueError(f"teacher must yield 3 feature maps, got channels {channels}")
        self.bottleneck = options(BottleneckOptions, bottleneck)
        scan = options(ScanOptions, scan)
        self.mff_oce = build_bottleneck(self.bottleneck, channels, image_size, d_state, scan.backend)
        dims = [self.mff_oce.out_channels, *channels[::-1]]
        self.net_s = MambaDecoder(
            dims=dims,
            depths=depths,
            d_state=d_state,
            drop_path=drop_path,
            scan=scan,
            lss=lss,
            image_size=image_size,
        )
        self.train(True)

    def forward(self, imgs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(teacher_feats, student_feats)``, each largest map first; teacher detached."""
        with torch.no_grad():
            feats_t = [f.detach() for f in self.net_t(imgs)]
        feats_s = self.net_s(self.mff_oce(feats_t))
        return feats_t, feats_s

    @torch.no_grad()
    def predict(
        self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[B, H, W]`` (at ``out_size``, default the input's) and image scores ``[B]``.

        The maps are ``1 - cos`` between teacher and student features, upsampled and summed over
        scales, then blurred with ``sigma``; a score is its map's maximum. Computed in float32
        (outside autocast), so 16-bit training does not change the reported maps' precision.
        """
        feats_t, feats_s = self(imgs)
        size = tuple(imgs.shape[-2:]) if out_size is None else out_size
        with torch.autocast(imgs.device.type, enabled=False):
            feats_t = [at_least_float32(f) for f in feats_t]
            feats_s = [at_least_float32(f) for f in feats_s]
            return anomaly_maps_and_scores(feats_t, feats_s, size, self.sigma)

    def load_weights(self, path: str | Path, log: Callable[[str], object] | None = None) -> None:
        """Load our checkpoints and the authors' (renamed, scan tables checked; see
        :mod:`model.mambaad.official`)."""
        load_weights(self, path, log=log)

    def cost_parts(self) -> dict[str, nn.Module]:
        """Teacher, bottleneck and decoder, as the paper's Table 2 and 5 split them."""
        return {"teacher": self.net_t, "bottleneck": self.mff_oce, "decoder": self.net_s}

    def parameter_counts(self) -> dict[str, int]:
        """:func:`count_parameters` (scan index buffers included, as the official 25.7 M)."""
        return count_parameters(self)

    def unused_parameter_names(self) -> list[str]:
        """Parameters forward never uses (the official LSS's ``conv33``); DDP must not wait for them."""
        return [name for name, _ in self.named_parameters() if ".conv33." in name]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients (bottleneck + decoder)."""
        return [p for p in self.parameters() if p.requires_grad]


def _index_buffer_count(module: nn.Module) -> int:
    return sum(
        b.numel() for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in INDEX_BUFFER_NAMES
    )


def count_parameters(model: MambaAD, include_index_buffers: bool = True) -> dict[str, int]:
    """Parameter counts: ``total``, ``teacher``, ``bottleneck``, ``decoder`` (plus ``trainable``).

    With ``include_index_buffers`` the scan permutation buffers (``index_flat``,
    ``index_flat_inv``) are counted in ``decoder``/``total``, as the official model stored
    them as non-trainable parameters and its reported 25.7 M includes them.
    """
    parts = {"teacher": model.net_t, "bottleneck": model.mff_oce, "decoder": model.net_s}
    counts = {key: sum(p.numel() for p in m.parameters()) for key, m in parts.items()}
    if include_index_buffers:
        counts = {key: n + _index_buffer_count(parts[key]) for key, n in counts.items()}
    counts["total"] = sum(counts.values())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts
