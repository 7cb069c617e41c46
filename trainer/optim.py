"""Optimisers and learning-rate schedules by config name: the ``OPTIMIZERS`` and ``SCHEDULERS`` registries.

An optimiser entry takes parameter groups (one :class:`model.base.OptimizerSpec` of the method)
and the ``optim`` section's values; a schedule entry takes an optimiser and the ``scheduler``
section. ``optim.type`` and ``scheduler.type`` name the entries (a method may name another
optimiser for one of its optimisers), and an unknown name is an error listing the known ones.
"""

from __future__ import annotations

from typing import Any

import torch

from util.config import Section
from util.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], o: Section) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) over ``groups``."""
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], o: Section) -> torch.optim.Optimizer:
    """Adam (weight decay as an L2 term of the gradient) over ``groups``."""
    return torch.optim.Adam(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], o: Section) -> torch.optim.Optimizer:
    """SGD with ``optim.momentum`` (0 when the section has none) over ``groups``."""
    momentum = float(getattr(o, "momentum", 0.0))
    return torch.optim.SGD(groups, lr=o.lr, momentum=momentum, weight_decay=o.weight_decay)


def build_optimizers(model: Any, o: Section) -> dict[str, tuple[torch.optim.Optimizer, Section]]:
    """The method's optimisers by name (:meth:`model.base.AnomalyModel.optimizers`), each with the
    ``optim`` values it was built from (the section's, with the method's per-optimiser options)."""
    built = {}
    for spec in model.optimizers(o.weight_decay, no_decay=o.no_decay):
        values = Section(**{**dict(o.items()), **spec.options})
        values.type = spec.type or o.type
        values.lr = values.lr * spec.lr_scale
        built[spec.name] = (OPTIMIZERS.build(values.type, spec.groups, values), values)
    return built


@SCHEDULERS.register("step")
def step(optimizer: torch.optim.Optimizer, s: Section) -> torch.optim.lr_scheduler.LRScheduler:
    """Multiply the learning rate by ``gamma`` after each epoch in ``milestones``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s.milestones), gamma=s.gamma)
