"""MambaAD: frozen CNN teacher, Half-FPN bottleneck, Mamba student decoder.

Submodule names (``net_t``, ``mff_oce``, ``net_s``) are the official checkpoint prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from model.hfpn import HalfFPN
from model.mamba_decoder import MambaDecoder
from model.teacher import build_teacher, calibrate_batchnorm

INDEX_BUFFER_NAMES = ("index_flat", "index_flat_inv")
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)


class MambaAD(nn.Module):
    """Teacher features ``net_t(x)`` vs. student reconstruction ``net_s(mff_oce(net_t(x)))``.

    ``lss_*`` select the LSS design of the decoder (paper Table 4); the defaults are the
    paper's model, whose state dict matches the authors' ADer checkpoints key for key.
    """

    def __init__(
        self,
        teacher: str = "resnet34",
        teacher_pretrained: bool = False,
        teacher_checkpoint: str | Path | None = None,
        depths: Sequence[int] = (3, 4, 6, 3),
        scan_method: str = "hilbert",
        num_directions: int = 8,
        d_state: int = 16,
        drop_path_rate: float = 0.2,
        scan_backend: str = "auto",
        image_size: int = 256,
        lss_blocks: int | None = None,
        lss_kernels: Sequence[int] = (5, 7),
        lss_pointwise: bool = True,
        lss_residual: bool = True,
        log: Callable[[str], object] = print,
    ) -> None:
        super().__init__()
        self.net_t = build_teacher(
            teacher, pretrained=teacher_pretrained, checkpoint=teacher_checkpoint, log=log
        )
        channels = list(self.net_t.feature_info.channels())
        if len(channels) != 3:
            raise ValueError(f"teacher must yield 3 feature maps, got channels {channels}")
        self.mff_oce = HalfFPN(channels)
        dims = [self.mff_oce.out_channels, *channels[::-1]]
        self.net_s = MambaDecoder(
            dims=dims,
            depths=depths,
            d_state=d_state,
            drop_path_rate=drop_path_rate,
            scan_method=scan_method,
            num_directions=num_directions,
            scan_backend=scan_backend,
            image_size=image_size,
            lss_blocks=lss_blocks,
            lss_kernels=lss_kernels,
            lss_pointwise=lss_pointwise,
            lss_residual=lss_residual,
        )
        self.frozen_layers = ("net_t",)
        self.train(True)

    def train(self, mode: bool = True) -> MambaAD:
        """Set train/eval mode for the student parts; the teacher always stays frozen in eval."""
        self.training = mode
        for name, module in self.named_children():
            if name in self.frozen_layers:
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)
            else:
                module.train(mode)
        return self

    @property
    def teacher_is_random(self) -> bool:
        """True when the teacher was built without pretrained or checkpoint weights."""
        return bool(getattr(self.net_t, "is_random", False))

    def calibrate_teacher(self, images: Iterable[torch.Tensor], max_batches: int = 8) -> int:
        """Estimate a random teacher's BatchNorm statistics on training images (no-op otherwise).

        Returns the number of batches used (0 when the teacher has real weights).
        """
        if not self.teacher_is_random:
            return 0
        return calibrate_batchnorm(self.net_t, images, max_batches)

    def forward(self, imgs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(teacher_feats, student_feats)``, each largest map first; teacher detached."""
        with torch.no_grad():
            feats_t = [f.detach() for f in self.net_t(imgs)]
        feats_s = self.net_s(self.mff_oce(feats_t))
        return feats_t, feats_s

    def unused_parameter_names(self) -> list[str]:
        """Parameters forward never uses (the official LSS's ``conv33``); DDP must not wait for them."""
        return [name for name, _ in self.named_parameters() if ".conv33." in name]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients (bottleneck + decoder)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, weight_decay: float, no_decay: str = "ader") -> list[dict]:
        """Two AdamW groups: ``[{decay}, {no decay}]`` over the trainable parameters.

        ``no_decay`` names the rule in :data:`NO_DECAY_RULES` that picks the undecayed ones:
        ``ader`` (the authors' optimiser, ADer ``optim.add_weight_decay``: 1-D tensors and names
        ending in ``.bias``, so ``A_logs`` and ``dt_projs_bias`` are decayed) or ``flagged``
        (also ``A_logs``, ``Ds``, ``dt_projs_bias``, every norm layer and anything flagged
        ``_no_weight_decay``, as the SSM code intends but the authors' optimiser ignores).
        """
        if no_decay not in NO_DECAY_RULES:
            choices = ", ".join(NO_DECAY_RULES)
            raise ValueError(f"optim.no_decay={no_decay!r} is not supported; use one of {choices}")
        rule = NO_DECAY_RULES[no_decay]
        norm_params = {id(p) for m in self.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters()}
        decay, undecayed = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (undecayed if rule(name, p, norm_params) else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ]


def _ader_no_decay(name: str, p: nn.Parameter, norm_params: set[int]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def _flagged_no_decay(name: str, p: nn.Parameter, norm_params: set[int]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        id(p) in norm_params
        or leaf == "bias"
        or leaf.endswith("_bias")
        or leaf in ("A_logs", "Ds")
        or getattr(p, "_no_weight_decay", False)
    )


# optim.no_decay -> whether a trainable parameter (name, tensor, ids of norm-layer params) is undecayed
NO_DECAY_RULES: dict[str, Callable[[str, nn.Parameter, set[int]], bool]] = {
    "ader": _ader_no_decay,
    "flagged": _flagged_no_decay,
}


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
