"""Trainers and evaluators: the ``TRAINERS`` and ``EVALUATORS`` registries."""

from util.registry import Registry

TRAINERS = Registry("trainer")
TRAINERS.register_lazy("ad_trainer", "trainer.ad_trainer:ADTrainer")

EVALUATORS = Registry("evaluator")
EVALUATORS.register_lazy("ad_evaluator", "trainer.evaluator:ADEvaluator")
