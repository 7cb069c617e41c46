"""Name-to-callable registries with lazy imports.

Each component kind (datasets, models, losses, trainers, evaluators) owns one
:class:`Registry`. Entries are declared as ``"package.module:attribute"`` strings and
imported only when looked up, so an optional dependency of one component (for
example ``mamba_ssm``) never breaks the import of another.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from util.errors import UsageError


class RegistryError(UsageError, KeyError):
    """Raised for an unknown or badly declared registry entry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class Registry:
    """A small mapping from names to callables, resolved lazily."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str | Callable[..., Any]] = {}

    def register_lazy(self, name: str, target: str) -> None:
        """Declare ``name`` as ``"module.path:attribute"``, imported on first use."""
        if ":" not in target:
            raise RegistryError(f"{self.kind} '{name}': target {target!r} must look like 'module:attr'")
        self._add(name, target)

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a callable under ``name`` (default: its ``__name__``)."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._add(name or fn.__name__, fn, replace_lazy=True)
            return fn

        return wrap

    def _add(self, name: str, target: str | Callable[..., Any], replace_lazy: bool = False) -> None:
        existing = self._targets.get(name)
        if (
            existing is not None
            and existing is not target
            and not (replace_lazy and isinstance(existing, str))
        ):
            raise RegistryError(f"{self.kind} '{name}' is registered twice")
        self._targets[name] = target

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._targets)

    def __contains__(self, name: str) -> bool:
        return name in self._targets

    def get(self, name: str) -> Callable[..., Any]:
        """Return the callable for ``name``, importing its module if needed."""
        if name not in self._targets:
            close = difflib.get_close_matches(name, self._targets, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names()) or 'none'}."
            )
        target = self._targets[name]
        if isinstance(target, str):
            module_name, attr = target.split(":", 1)
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise RegistryError(
                    f"{self.kind} {name!r} needs module {module_name!r}, which failed to import: {err}"
                ) from err
            target = getattr(module, attr)
            self._targets[name] = target
        return target

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Look up ``name`` and call it with the given arguments."""
        return self.get(name)(*args, **kwargs)
