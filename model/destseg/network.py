"""DeSTSeg: frozen teacher ``net_t``, denoising student ``net_s`` + ``decoder``, ``segmentation_net``.

Submodules and the names below them follow ADer's ``model/destseg.py``; ADer's model holds the
teacher and the student encoder twice (``net_t``/``net_s`` and again under ``destseg.``), which
:meth:`DeSTSeg.load_weights` folds onto the one copy kept here, so its checkpoints load strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from model.base import AnomalyModel, CheckpointMismatchError, OptimizerSpec
from model.destseg.blocks import SegmentationNet, StudentDecoder
from model.teacher import TeacherOptions, build_teacher, teacher_options
from util.precision import at_least_float32

STAGES = ("student", "segmentation")

# ADer's checkpoint names -> ours (the first matching prefix wins; None: a duplicate to drop)
_ADER_PREFIXES = (
    ("destseg.teacher_net.encoder.", None),
    ("destseg.student_net.encoder.", None),
    ("destseg.student_net.", "decoder."),
    ("destseg.segmentation_net.", "segmentation_net."),
)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x`` divided by its channel norm plus ``eps`` (ADer's ``l2_normalize``, not ``F.normalize``)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DeSTSeg(AnomalyModel):
    """Denoising student-teacher with a segmentation head, trained in two stages.

    The arguments are the ``model.*`` config keys: ``teacher`` (:class:`TeacherOptions` or a timm
    name; ADer's is ResNet18 with torchvision's ImageNet weights, stages 1-3), ``student`` (the
    timm encoder of the student, random, stages 1-4), ``seg_width`` and ``aspp_rates`` (the
    segmentation network), ``student_fraction`` (the share of epochs that trains the student;
    ADer: the first fifth), ``student_lr_scale`` (the student's SGD learning rate over
    ``optim.lr``; ADer: 40), ``res_lr_scale`` and ``head_lr_scale`` (the segmentation network's
    residual stage and ASPP head; ADer: 10 and 1) and ``score_top_k`` (an image's score is the
    mean of its ``k`` highest segmentation outputs; ADer: 100).
    """

    frozen_layers = ("net_t",)
    teacher_layer = "net_t"

    def __init__(
        self,
        teacher: str | TeacherOptions | Mapping[str, Any] = "resnet18.tv_in1k",
        student: str = "resnet18",
        seg_width: int = 256,
        aspp_rates: Sequence[int] = (6, 12, 18),
        student_fraction: float = 0.2,
        student_lr_scale: float = 40.0,
        res_lr_scale: float = 10.0,
        head_lr_scale: float = 1.0,
        score_top_k: int = 100,
        image_size: int | Sequence[int] = 256,
        log: Callable[[str], object] = print,
    ) -> None:
        super().__init__()
        self.teacher = teacher_options(teacher)
        t = self.teacher
        self.net_t = build_teacher(
            t.name, t.pretrained, t.checkpoint, out_indices=(1, 2, 3), log=log,
            from_model_checkpoint=t.from_model_checkpoint,
        )  # fmt: skip
        # timm's default init (last BatchNorm of each residual branch zero), as ADer builds it
        student_encoder = timm.create_model(
            student, features_only=True, out_indices=(1, 2, 3, 4), pretrained=False
        )
        widths = [int(c) for c in student_encoder.feature_info.channels()]
        teacher_widths = [int(c) for c in self.net_t.feature_info.channels()]
        if widths[:3] != teacher_widths:
            raise ValueError(
                f"the student's first three feature widths {widths[:3]} must equal the teacher's "
                f"{teacher_widths}"
            )
        # the decoder registers first: the trainer clips gradients in the model's parameter order,
        # which is then ADer's (its student_net holds the decoder before the encoder)
        self.decoder = StudentDecoder(widths)
        self.net_s = student_encoder
        self.segmentation_net = SegmentationNet(sum(teacher_widths), int(seg_width), tuple(aspp_rates))
        self.student_fraction = float(student_fraction)
        self.lr_scales = (float(student_lr_scale), float(res_lr_scale), float(head_lr_scale))
        self.score_top_k = int(score_top_k)
        self.current_stage = STAGES[0]
        self.train(True)

    # ------------------------------------------------------------------ networks
    def teacher_features(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's three maps, channel-normalised."""
        with torch.no_grad():
            return [l2_normalize(f.detach()) for f in self.net_t(imgs)]

    def student_features(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """The student's three decoded maps (strides 4, 8, 16), channel-normalised."""
        return [l2_normalize(f) for f in self.decoder(self.net_s(imgs))]

    def segment(self, feats_t: Sequence[torch.Tensor], feats_s: Sequence[torch.Tensor]) -> torch.Tensor:
        """Segmentation output ``[B, 1, h, w]`` (stride 4) from the negated teacher-student products."""
        size = feats_s[0].shape[2:]
        return self.segmentation_net(
            torch.cat([_resize(-t * s, size) for t, s in zip(feats_t, feats_s)], dim=1)
        )

    def forward(
        self, img_aug: torch.Tensor, img_origin: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """ADer's forward: ``(segmentation [B,1,h,w], product of the 1 - cos maps [B,1,h,w], the
        three 1 - cos maps, the mask at the segmentation's size thresholded at 0.5)``.

        The student sees the augmented image; its features are compared with the teacher's of the
        original (the same image when ``img_origin`` is None, as at test time).
        """
        img_origin = img_aug if img_origin is None else img_origin
        feats_s = self.student_features(img_aug)
        seg = self.segment(self.teacher_features(img_aug), feats_s)
        feats_t = self.teacher_features(img_origin)
        size = feats_s[0].shape[2:]
        cos_maps = [1 - (s * t).sum(dim=1, keepdim=True) for t, s in zip(feats_t, feats_s)]
        de_st = torch.cat([_resize(m, size) for m in cos_maps], dim=1).prod(dim=1, keepdim=True)
        if mask is not None:
            mask = (_resize(mask, seg.shape[2:]) >= 0.5).to(mask.dtype)
        return seg, de_st, cos_maps, mask

    # ------------------------------------------------------------------ training
    def train_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """The synthesized image, the original and the synthetic mask (``data.type=SynthesizedAD``)."""
        return batch["augmented_image"], batch["img"], batch["img_mask"]

    def loss_terms(self, outputs: Any, batch: Mapping[str, Any], criterion: Any) -> dict[str, torch.Tensor]:
        """The stage's terms of the config's ``loss`` (``model.destseg.loss.DeSTSegLoss``): ``cos``
        while the student trains, then ``l1`` and ``focal`` of the segmentation."""
        seg, _, cos_maps, mask = outputs
        if self.current_stage == "student":
            return criterion.student(cos_maps)
        return criterion.segmentation(seg, mask)

    def stage(self, epoch: int, epochs: int) -> str:
        """``student`` for the first ``student_fraction`` of the epochs (ADer: 0-based epoch <
        epochs / 5), then ``segmentation``."""
        return "student" if epoch - 1 < epochs * self.student_fraction else "segmentation"

    def enter_stage(self, stage: str) -> None:
        """Each stage freezes the part it does not train (no gradients; the segmentation stage keeps
        the student's BatchNorm statistics), so that data-parallel training reduces exactly the
        parameters the stage trains (the trainer rebuilds its DDP wrapper when they change)."""
        if stage not in STAGES:
            raise ValueError(f"DeSTSeg has no stage {stage!r}; its stages are {', '.join(STAGES)}")
        self.current_stage = stage
        for module in (self.net_s, self.decoder):
            for p in module.parameters():
                p.requires_grad_(stage == "student")
        for p in self.segmentation_net.parameters():
            p.requires_grad_(stage == "segmentation")
        self.train(self.training)

    def train(self, mode: bool = True) -> DeSTSeg:
        """Train mode for the part the stage trains; the other part and the teacher stay in eval
        mode (ADer sets the same modes every step)."""
        super().train(mode)
        if mode:
            idle = (self.segmentation_net,) if self.current_stage == "student" else (self.net_s, self.decoder)
            for module in idle:
                module.eval()
        return self

    def optimizers(self, weight_decay: float, no_decay: str = "ader") -> list[OptimizerSpec]:
        """ADer's two SGD optimisers (momentum and weight decay from the ``optim`` section):

        ``student`` over the student encoder and decoder at ``student_lr_scale`` x ``optim.lr``,
        1-D tensors and biases undecayed (its ``get_optim``); ``segmentation`` with the residual
        stage at ``res_lr_scale`` x and the head at ``head_lr_scale`` x ``optim.lr``, everything
        decayed. Each group's ``lr_scale`` multiplies ``optim.lr`` (:func:`trainer.optim.build_optimizers`).
        """
        student_scale, res_scale, head_scale = self.lr_scales
        decay, undecayed = [], []
        for name, p in [*self.decoder.named_parameters(), *self.net_s.named_parameters()]:
            (undecayed if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        seg = self.segmentation_net
        return [
            OptimizerSpec(
                "student",
                [
                    {"params": undecayed, "weight_decay": 0.0, "lr_scale": student_scale},
                    {"params": decay, "weight_decay": weight_decay, "lr_scale": student_scale},
                ],
            ),
            OptimizerSpec(
                "segmentation",
                [
                    {
                        "params": list(seg.res.parameters()),
                        "weight_decay": weight_decay,
                        "lr_scale": res_scale,
                    },
                    {
                        "params": list(seg.head.parameters()),
                        "weight_decay": weight_decay,
                        "lr_scale": head_scale,
                    },
                ],
            ),
        ]

    # ------------------------------------------------------------------ testing
    @torch.no_grad()
    def predict(
        self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps ``[B, H, W]``: the segmentation output bilinearly resized to ``out_size`` (default the
        input's); scores ``[B]``: the mean of its ``score_top_k`` highest values at its own
        resolution (ADer's DeSTSeg trainer). Only the segmentation path runs (the ``1 - cos`` maps
        do not enter the map or the score)."""
        seg = self.segment(self.teacher_features(imgs), self.student_features(imgs))
        size = tuple(imgs.shape[-2:]) if out_size is None else tuple(out_size)
        with torch.autocast(imgs.device.type, enabled=False):
            seg = at_least_float32(seg)
            maps = _resize(seg, size)[:, 0]
            flat = seg.flatten(1)
            top = flat.topk(min(self.score_top_k, flat.shape[1]), dim=1).values
        return maps, top.mean(dim=1)

    # ------------------------------------------------------------------ weights and cost
    def checkpoint_state(self, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
        """Ours, or ADer's (``net_t.*``/``net_s.*`` and ``destseg.*``), whose second copies of the
        teacher and the student encoder must equal the first ones."""
        return _from_ader(state, path) if any(k.startswith("destseg.") for k in state) else state

    def cost_parts(self) -> dict[str, nn.Module]:
        """Teacher, student encoder, student decoder and segmentation network (``tools/flops.py``)."""
        return {
            "teacher": self.net_t,
            "student_encoder": self.net_s,
            "student_decoder": self.decoder,
            "segmentation": self.segmentation_net,
        }


def _from_ader(state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """ADer's DeSTSeg state dict in our names; its duplicate encoders are checked and dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix, ours in _ADER_PREFIXES:
            if key.startswith(prefix):
                if ours is None:
                    first = ("net_t." if "teacher" in prefix else "net_s.") + key[len(prefix) :]
                    if first in state and not torch.equal(state[first], value):
                        raise CheckpointMismatchError(
                            f"model.checkpoint={path}: {key} differs from {first}, which ADer's DeSTSeg "
                            "shares; the file is damaged or not ADer's DeSTSeg"
                        )
                    if first not in state:
                        out[first] = value
                else:
                    out[ours + key[len(prefix) :]] = value
                break
        else:
            out[key] = value
    return out
