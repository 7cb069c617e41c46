"""The contract between a method (a folder under ``model/``) and the one trainer.

A method's model subclasses :class:`AnomalyModel` and overrides what differs from the defaults;
``trainer/ad_trainer.py`` calls nothing else. The hooks cover the methods of the paper's Table 1:
feature reconstruction with one optimiser (MambaAD, RD4AD, UniAD), a discriminator trained by a
second optimiser of another type (SimpleNet), and training stages that switch the trained part
by epoch (DeSTSeg). See docs/architecture.md ("The method contract") for an example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.teacher import calibrate_batchnorm
from util.checkpoint import extract_state_dict, load_file
from util.errors import UserError


class CheckpointMismatchError(UserError, RuntimeError):
    """A weights file that does not fit the configured model; the message names the keys to check."""


@dataclass
class OptimizerSpec:
    """One optimiser of a method: its name (the key in checkpoints and logs), its parameter groups
    (torch ``param_groups``, which may carry their own ``lr``, ``lr_scale`` (times ``optim.lr``) or
    ``weight_decay``), the
    ``OPTIMIZERS`` entry that builds it (None: the config's ``optim.type``) and values that
    replace the ``optim`` section's for this optimiser (e.g. ``{"betas": (0.5, 0.999)}``)."""

    name: str
    groups: list[dict[str, Any]]
    type: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)


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


class AnomalyModel(nn.Module):
    """Base class of every method's model; the defaults are a one-stage, one-optimiser method.

    Training, per batch: ``outputs = model(*model.train_inputs(batch))`` (through DDP), then
    ``model.loss_terms(outputs, batch, criterion)`` gives named loss tensors; their sum is
    back-propagated and every optimiser of :meth:`optimizers` steps (each clipped on its own
    parameters). Per epoch: :meth:`stage` names the training stage, and :meth:`enter_stage` runs
    when it changes. Testing: :meth:`predict` returns the maps and image scores the evaluator
    scores. Children named in ``frozen_layers`` stay in eval mode without gradients.
    """

    frozen_layers: tuple[str, ...] = ()
    teacher_layer: str | None = None  # the child built by model.teacher.build_teacher, if any
    teacher: Any = None  # its TeacherOptions (model.teacher)

    def train(self, mode: bool = True) -> AnomalyModel:
        """Set train/eval mode; the children in ``frozen_layers`` always stay frozen in eval."""
        self.training = mode
        for name, module in self.named_children():
            if name in self.frozen_layers:
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)
            else:
                module.train(mode)
        return self

    def train_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """What ``forward`` takes during training, from a data batch (default: the images)."""
        return (batch["img"],)

    def loss_terms(
        self, outputs: Any, batch: Mapping[str, Any], criterion: Callable[..., torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Named loss tensors of one batch; the trainer back-propagates their sum and logs each.

        ``criterion`` is the config's ``loss`` (a ``LOSSES`` entry); the default applies it to
        ``forward``'s outputs.
        """
        return {"loss": criterion(*outputs)}

    def stage(self, epoch: int, epochs: int) -> str:
        """The training stage of ``epoch`` (1-based) of ``epochs``; one stage by default."""
        return "train"

    def enter_stage(self, stage: str) -> None:
        """Called when training enters ``stage`` (also on resume); e.g. freeze the finished part."""

    def parameter_groups(self, weight_decay: float, no_decay: str = "ader") -> list[dict]:
        """Two groups: ``[{decay}, {no decay}]`` over the trainable parameters.

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

    def optimizers(self, weight_decay: float, no_decay: str = "ader") -> list[OptimizerSpec]:
        """The optimisers to build, from the ``optim`` section's decay settings (default: one,
        ``main``, over :meth:`parameter_groups`)."""
        return [OptimizerSpec("main", self.parameter_groups(weight_decay, no_decay=no_decay))]

    def load_weights(self, path: str | Path, log: Callable[[str], object] | None = None) -> None:
        """Load a weights file strictly: ours (bare or inside ``{"net": ...}``), or another naming
        that :meth:`checkpoint_state` translates (ADer's checkpoints of a method)."""
        state = self.checkpoint_state(extract_state_dict(load_file(path), path), path)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:
            details = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
            raise CheckpointMismatchError(
                f"model.checkpoint={path} does not match the configured model ({type(self).__name__}): "
                f"{details}. Check the model.* keys and data.image_size against the run that saved it."
            ) from err
        if log is not None:
            log(f"loaded model weights from {path}")

    def checkpoint_state(self, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
        """A loaded state dict under this module's keys: itself here; methods whose published
        checkpoints use other names (ADer's) override it."""
        return state

    def unused_parameter_names(self) -> list[str]:
        """Parameters forward never uses (kept for checkpoint compatibility); DDP must not wait for them."""
        return []

    def cost_parts(self) -> dict[str, nn.Module]:
        """The parts whose parameters and FLOPs ``tools/flops.py`` reports (default: every child
        module by name); each is counted on the inputs it gets in one ``forward``."""
        return dict(self.named_children())

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per :meth:`cost_parts` entry, ``total`` and ``trainable``."""
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in self.cost_parts().items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    @property
    def teacher_is_random(self) -> bool:
        """True when the ``teacher_layer`` was built without pretrained or checkpoint weights."""
        module = getattr(self, self.teacher_layer) if self.teacher_layer else None
        return bool(getattr(module, "is_random", False))

    def calibrate_teacher(self, images: Iterable[torch.Tensor]) -> int:
        """Estimate a random teacher's BatchNorm statistics on training images, up to
        ``teacher.calibrate_batches`` batches; returns how many were used (0 when the teacher has
        real weights, calibration is off, or the method has no teacher)."""
        if not self.teacher_is_random or not self.teacher.calibrate_batches:
            return 0
        return calibrate_batchnorm(getattr(self, self.teacher_layer), images, self.teacher.calibrate_batches)

    def predict(
        self, imgs: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps ``[B, H, W]`` (at ``out_size``, default the input's) and image scores ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict")
