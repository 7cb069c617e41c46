"""Evaluation: metrics (exact, torch, ADer and MambaAD-protocol modes), the streaming evaluator,
reports (tables, metrics.json/csv) and plots. The ``EVALUATORS`` registry."""

from util.registry import Registry

EVALUATORS = Registry("evaluator")
EVALUATORS.register_lazy("ad_evaluator", "evaluation.evaluator:ADEvaluator")
