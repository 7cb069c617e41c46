"""Rebuild the config of a run folder from its ``config.json`` without running code from the folder.

A config file is Python and runs when loaded, so a run folder (which may come from anyone) must not
decide which file runs. :func:`config_from_json` starts from one of this project's own config
classes (the ``configs/<name>.py`` that ``config.json`` names when it is this repository's file, else
the defaults of the run's method: ``configs/<model.type>_defaults.py``, ``configs/defaults.py`` for
MambaAD and older runs, ``configs/base.py`` for a method of yours) and restores every saved value
over it as plain data. To use a config file of your own, pass it explicitly (``-c`` / ``config=``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from util.config import BaseConfig, ConfigError, Section, apply_overrides, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
DEFAULT_CONFIG = CONFIGS / "defaults.py"
BASE_CONFIG = CONFIGS / "base.py"
NOT_RESTORED = ("config_file",)  # names the file a run was started with; ours may differ
# keys that moved since older run folders were written: (old section, key) -> (new section, key)
MOVED_KEYS = {("evaluator", "sigma"): ("model", "sigma")}


def method_defaults(model_type: Any) -> Path:
    """The defaults of the method ``model_type`` (a ``model.type`` entry): ``configs/<type>_defaults.py``
    when this repository has it, ``configs/defaults.py`` for MambaAD (and runs that name no type),
    else ``configs/base.py`` (the saved ``model`` section then brings every key)."""
    if model_type is None or model_type == "mambaad":
        return DEFAULT_CONFIG
    if isinstance(model_type, str) and re.fullmatch(r"[a-z0-9_]+", model_type):
        candidate = CONFIGS / f"{model_type}_defaults.py"
        if candidate.is_file():
            return candidate
    return BASE_CONFIG


def project_config(named: Any, model_type: Any = None) -> Path:
    """This repository's config file that ``named`` (a ``config_file`` entry) refers to, else the
    defaults of the run's method (:func:`method_defaults`).

    Only a file directly in ``configs/`` counts: the entry ``configs/X.py`` (relative, as run.py
    records it when started from the repository root) or the absolute path of that file.
    """
    fallback = method_defaults(model_type)
    if not isinstance(named, str) or not named.endswith(".py"):
        return fallback
    given = Path(named)
    candidate = CONFIGS / given.name
    if not candidate.is_file():
        return fallback
    ours = candidate.resolve()
    if given.is_absolute():
        return ours if given.resolve() == ours else fallback
    return ours if (REPO / given).resolve() == ours else fallback


def _restore(node: Section, saved: dict[str, Any]) -> None:
    """Set every saved value on ``node`` (nested dicts into sections; lists to tuples where expected).

    Private names and names of the classes' own attributes (methods, properties) are skipped, so
    saved data can only ever fill config values.
    """
    for key, value in saved.items():
        if not isinstance(key, str) or key.startswith("_") or hasattr(type(node), key):
            continue
        current = getattr(node, key, None)
        if isinstance(value, dict):
            if not isinstance(current, Section):
                current = Section()
                setattr(node, key, current)
            _restore(current, value)
        elif not isinstance(current, Section):
            setattr(
                node, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
            )


def _move_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys of :data:`MOVED_KEYS` at their current place (older run folders)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (old_section, key), (new_section, new_key) in MOVED_KEYS.items():
        section = out.get(old_section)
        if isinstance(section, dict) and key in section:
            value = section.pop(key)
            target = out.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_key, value)
    return out


def config_from_json(
    saved: dict[str, Any], overrides: Sequence[str] = (), source: str = "config.json"
) -> BaseConfig:
    """A config built from saved values over the project's own config class; ``overrides`` apply last.

    Saved values win over the class's (derived ones included, so nothing is recomputed); keys the
    class lacks (e.g. sections a custom config added) are restored as plain values.
    """
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{source} must hold a JSON object of config sections; it was not written by run.py"
        )
    saved = _move_keys(saved)
    model = saved.get("model")
    base = project_config(saved.get("config_file"), model.get("type") if isinstance(model, dict) else None)
    cfg = load_config(base)
    name = cfg.name
    _restore(cfg, {k: v for k, v in saved.items() if k not in NOT_RESTORED})
    if not isinstance(cfg.name, str):
        cfg.name = name
    apply_overrides(cfg, list(overrides))
    cfg.validate()
    return cfg


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> BaseConfig:
    """The config a run used, from ``run_dir/config.json`` as data: no file from the folder is executed."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist; pass a run folder written by run.py (it holds config.json)"
        )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}); restore it from the run or pass -c CONFIG"
        ) from err
    return config_from_json(saved, overrides, source=str(path))
