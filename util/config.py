"""Python-class configurations with command-line overrides and derived values.

A config file in ``configs/`` defines one subclass of :class:`BaseConfig` (directly or
through inheritance). Its ``__init__`` sets plain values, grouped in :class:`Section`
objects; its ``derive()`` computes values that depend on others (learning-rate scaling,
schedule milestones, test epochs). :func:`load_config` instantiates the class, applies
``a.b.c=value`` overrides, then calls ``derive()``, so derived values always reflect the
overrides, while a derived key set explicitly (on the command line or by a config class)
keeps that value.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from util.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A config file, key or override value is invalid; the message says how to fix it."""


class Section:
    """A named group of config values (attribute access, nestable, JSON-serialisable)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Public (non-underscore) key/value pairs in insertion order."""
        return ((k, v) for k, v in self.__dict__.items() if not k.startswith("_"))

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict of this section's values."""
        return {k: v.to_dict() if isinstance(v, Section) else v for k, v in self.items()}

    def __repr__(self) -> str:
        return f"Section({', '.join(f'{k}={v!r}' for k, v in self.items())})"


class BaseConfig(Section):
    """Root of every configuration class; subclasses extend ``__init__`` and ``derive``."""

    def __init__(self) -> None:
        super().__init__()
        self._overridden: set[str] = set()

    def derive(self) -> None:
        """Compute values that depend on others; called after overrides are applied."""

    def validate(self) -> None:
        """Check values (after ``derive``); raise :class:`ConfigError` naming every bad key and its fix."""

    # dotted keys whose number may also be given as a list (e.g. an image size as [height, width]);
    # ``validate`` checks the list
    LIST_OR_NUMBER: tuple[str, ...] = ()

    def set_derived(self, key: str, value: Any) -> None:
        """Fill the derived value at dotted ``key`` unless it was already set.

        A key set on the command line, or given a value (not None) by a config class's
        ``__init__``, keeps that value; derived keys are therefore declared as None.
        """
        parent, name = _resolve_parent(self, key, create=True)
        if key not in self._overridden and getattr(parent, name, None) is None:
            setattr(parent, name, value)

    @property
    def overridden(self) -> frozenset[str]:
        """Dotted keys set from the command line."""
        return frozenset(self._overridden)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_at_least(minimum: int) -> tuple[Any, str]:
    """A rule for :func:`check_values`: a whole number of at least ``minimum``."""
    return (lambda v: _is_int(v) and v >= minimum), f"a whole number of at least {minimum}"


def number_at_least(minimum: float, allow_none: bool = False) -> tuple[Any, str]:
    """A rule for :func:`check_values`: a number of at least ``minimum`` (or None)."""
    text = f"a number of at least {minimum:g}" + (" or None" if allow_none else "")
    return (lambda v: (allow_none and v is None) or (_is_number(v) and v >= minimum)), text


def one_of(*choices: Any) -> tuple[Any, str]:
    """A rule for :func:`check_values`: one of ``choices``."""
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def check_values(cfg: Section, rules: dict[str, tuple[Any, str]]) -> None:
    """Check dotted keys against ``(predicate, expectation)`` rules; one error lists every bad key."""
    bad = []
    for key, (ok, expected) in rules.items():
        value = get_key(cfg, key)
        if not ok(value):
            bad.append(f"{key}={value!r} must be {expected}")
    if bad:
        raise ConfigError(
            "invalid config value(s): " + "; ".join(bad) + ". Fix them in the config file or on the "
            "command line (section.key=value)."
        )


def flat_keys(section: Section | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """All leaf keys of a :class:`Section` or of a saved config dict as ``{"a.b.c": value}``."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Section | dict):
            out.update(flat_keys(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def get_key(cfg: Section, key: str) -> Any:
    """Value at dotted ``key``; :class:`ConfigError` naming the key if it does not exist."""
    parent, name = _resolve_parent(cfg, key)
    if not hasattr(parent, name) or name.startswith("_"):
        raise ConfigError(_unknown_key_message(cfg, key))
    return getattr(parent, name)


def _resolve_parent(cfg: Section, key: str, create: bool = False) -> tuple[Section, str]:
    parts = key.split(".")
    node: Section = cfg
    for i, part in enumerate(parts[:-1]):
        child = getattr(node, part, None)
        if child is None and create:
            child = Section()
            setattr(node, part, child)
        if not isinstance(child, Section):
            raise ConfigError(_unknown_key_message(cfg, ".".join(parts[: i + 1]) + ".*"))
        node = child
    return node, parts[-1]


def _unknown_key_message(cfg: Section, key: str) -> str:
    keys = list(flat_keys(cfg))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # fall back to matching the last component, e.g. 'lr' -> 'optim.lr'
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Run with --print-config to list all keys."


def parse_value(text: str, current: Any = None, key: str = "") -> Any:
    """Parse an override's text into a Python value, guided by the current value's type."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if isinstance(current, bool) or lowered in ("true", "false"):
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} expects true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (int, float, str)):
        raise ConfigError(f"config key {key!r} expects a list such as {list(current)!r}, got {text!r}")
    if isinstance(current, (int, float)) and not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key!r} expects a number, got {text!r}")
    return value


def apply_overrides(cfg: BaseConfig, overrides: Sequence[str]) -> None:
    """Apply ``a.b.c=value`` strings to ``cfg``; unknown keys raise with a suggestion."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. trainer.epochs=10")
        key, text = item.split("=", 1)
        key = key.strip()
        current = get_key(cfg, key)
        if isinstance(current, Section):
            raise ConfigError(f"{key!r} is a section; override one of its keys, e.g. {key}.<name>=...")
        parent, name = _resolve_parent(cfg, key)
        either = key in cfg.LIST_OR_NUMBER and text.strip().startswith(("[", "("))
        setattr(parent, name, parse_value(text, None if either else current, key))
        cfg._overridden.add(key)


def find_config_class(module: Any, path: Path) -> type[BaseConfig]:
    """The single :class:`BaseConfig` subclass defined in ``module``."""
    candidates = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, BaseConfig) and obj.__module__ == module.__name__
    ]
    if len(candidates) != 1:
        found = ", ".join(c.__name__ for c in candidates) or "none"
        raise ConfigError(f"config file {path} must define exactly one BaseConfig subclass (found: {found})")
    return candidates[0]


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> BaseConfig:
    """Load the config class from a file, apply overrides, then compute derived values."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            names = [p.name for p in path.parent.glob("*.py")]
            close = difflib.get_close_matches(path.name, names, n=3)
            hint = f" Did you mean {', '.join(str(path.parent / c) for c in close)}?" if close else ""
        raise ConfigError(f"config file {path} does not exist.{hint}")
    module_name = f"_mambaad_config_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    repo_root = str(Path(__file__).resolve().parent.parent)
    if repo_root not in sys.path:  # config files import configs.* as a package
        sys.path.insert(0, repo_root)
    spec.loader.exec_module(module)
    cfg = find_config_class(module, path)()
    cfg.config_file = str(path)
    cfg.name = path.stem
    apply_overrides(cfg, overrides)
    cfg.derive()
    cfg.validate()
    return cfg


def config_to_dict(cfg: BaseConfig) -> dict[str, Any]:
    """The resolved config as a JSON-friendly dict, plus the overridden keys."""
    out = cfg.to_dict()
    out["_overridden"] = sorted(cfg.overridden)
    return out


def save_config(cfg: BaseConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (what the run actually used)."""
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2, default=str) + "\n")


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for resume checks)."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for key in keys:
        if key.startswith("_"):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_configs(va, vb, f"{prefix}{key}."))
        elif json.dumps(va, default=str) != json.dumps(vb, default=str):
            out.append(f"{prefix}{key}")
    return out


T = TypeVar("T")


def options(kind: type[T], value: T | Mapping[str, Any] | None) -> T:
    """``value`` as the options dataclass ``kind``: a config section's dict, an instance, or None."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} key(s) {unknown}; valid: {', '.join(sorted(names))}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
