"""Trainers: the ``TRAINERS`` registry."""

from util.registry import Registry

TRAINERS = Registry("trainer")
TRAINERS.register_lazy("ad_trainer", "trainer.ad_trainer:ADTrainer")
