"""Lazy registries: unknown names, broken optional modules, decorators."""

from __future__ import annotations

import sys

import pytest

from util.registry import Registry, RegistryError


def test_lazy_entry_is_imported_only_on_lookup() -> None:
    reg = Registry("thing")
    reg.register_lazy("dumps", "json:dumps")
    reg.register_lazy("broken", "a_module_that_does_not_exist_xyz:f")
    assert "a_module_that_does_not_exist_xyz" not in sys.modules
    assert reg.get("dumps")([1]) == "[1]"
    with pytest.raises(RegistryError, match="a_module_that_does_not_exist_xyz"):
        reg.get("broken")


def test_unknown_name_suggests_close_matches() -> None:
    reg = Registry("model")
    reg.register_lazy("mambaad", "json:dumps")
    with pytest.raises(RegistryError, match=r"unknown model 'mambad'.*'mambaad'"):
        reg.get("mambad")


def test_decorator_and_duplicates() -> None:
    reg = Registry("loss")

    @reg.register("l1")
    def l1(x: int) -> int:
        return abs(x)

    assert reg.build("l1", -3) == 3
    assert reg.names() == ["l1"]
    with pytest.raises(RegistryError, match="twice"):
        reg.register("l1")(lambda x: x)
    with pytest.raises(RegistryError, match="module:attr"):
        reg.register_lazy("bad", "no_colon")


def test_project_registries_do_not_import_models_eagerly() -> None:
    import data
    import evaluation
    import loss
    import model
    import trainer

    assert "mambaad" in model.MODELS and "DefaultAD" in data.DATASETS
    assert "feature_mse" in loss.LOSSES and "ad_trainer" in trainer.TRAINERS
    assert "ad_evaluator" in evaluation.EVALUATORS
