"""Optimisers and learning-rate schedules by config name: the ``OPTIMIZERS`` and ``SCHEDULERS`` registries.

Each entry takes the model (or optimiser) and its config section; ``optim.type`` and
``scheduler.type`` name the entry, and an unknown name is an error listing the known ones.
"""

from __future__ import annotations

import torch
from torch import nn

from util.config import Section
from util.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, o: Section) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups (``optim.no_decay`` picks the undecayed ones)."""
    groups = model.parameter_groups(o.weight_decay, no_decay=o.no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@SCHEDULERS.register("step")
def step(optimizer: torch.optim.Optimizer, s: Section) -> torch.optim.lr_scheduler.LRScheduler:
    """Multiply the learning rate by ``gamma`` after each epoch in ``milestones``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(s.milestones), gamma=s.gamma)
