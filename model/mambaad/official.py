"""Load the MambaAD authors' checkpoints (and our own) into the configured model.

The released ``mambaad_<dataset>.pth`` files follow the ADer copy of the model, whose
names ours share (``net_t.*``, ``mff_oce.*``, ``net_s.layers_up.*``, ``conv1b3``/``conv1a3``
around the 7x7 branch, an unused ``conv33``). The MambaAD repository's own model names the
7x7 wrappers ``conv1b7``/``conv1a7`` and has no ``conv33``. Both come bare, inside
``{"net": ...}`` (ADer's ``ckpt.pth``) or with a ``module.`` prefix. This module renames
keys to ours, checks the stored scan permutations (``scans.index_flat``/``_inv``) against
the configured scan, keeps from the model's own init what a file may lack (``conv33``,
scan permutations, BatchNorm ``num_batches_tracked``) and reports what it did.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.base import CheckpointMismatchError
from util.checkpoint import extract_state_dict, load_file

RENAMES = ((".conv1b7.", ".conv1b3."), (".conv1a7.", ".conv1a3."))
INDEX_SUFFIXES = (".scans.index_flat", ".scans.index_flat_inv")
HINT = (
    "Check model.teacher.name, model.depths, model.lss.*, model.scan.* and data.image_size "
    "against the run that saved it."
)


def _optional(key: str) -> bool:
    """Keys a checkpoint may lack or carry in excess without changing the model's output."""
    return ".conv33." in key or key.endswith((".num_batches_tracked", *INDEX_SUFFIXES))


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` changed: renamed, unused, kept-from-init and missing keys."""

    renamed: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was supplied (or may stay at init) and nothing unknown is left."""
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        """One line: renamed, unused and kept-from-init keys, grouped by pattern."""
        renames = Counter(_rename_pair(old) for old in self.renamed)
        parts = [
            "renamed " + (", ".join(f"{n} x {p}" for p, n in sorted(renames.items())) or "none"),
            "unused " + _patterns(self.unused + self.unexpected),
            "kept from init " + _patterns(self.kept),
        ]
        return "; ".join(parts)


def _rename_pair(key: str) -> str:
    for old, new in RENAMES:
        if old in key:
            return f"{old.strip('.')}->{new.strip('.')}"
    return "other"


def _patterns(keys: Iterable[str]) -> str:
    """Keys grouped with numeric path parts as ``*``: ``net_s.layers_up.*.blocks.*.conv33.*.weight (6)``."""
    counts = Counter(re.sub(r"\.\d+(?=\.)", ".*", k) for k in keys)
    if not counts:
        return "none"
    return ", ".join(f"{p} ({n})" for p, n in sorted(counts.items()))


def convert_state_dict(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an official (or our own) state dict onto the keys of ``target`` (our model's state dict).

    Returns the converted dict (complete whenever ``report.ok``) and the report. Raises
    ``ValueError`` when a stored scan permutation differs from the configured scan.
    """
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        new = key
        if new not in target:
            for old, repl in RENAMES:
                new = new.replace(old, repl)
            if new in target:
                report.renamed[key] = new
            else:
                (report.unused if _optional(key) else report.unexpected).append(key)
                continue
        if new.endswith(INDEX_SUFFIXES):
            value = _checked_index(new, value, target[new])
        out[new] = value
    for key, value in target.items():
        if key not in out:
            if _optional(key):
                out[key] = value
                report.kept.append(key)
            else:
                report.missing.append(key)
    return out, report


def _checked_index(key: str, stored: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """A stored scan permutation as ours (long); ``ValueError`` if it is another scan order.

    A different length (another input size) is left to the strict load's shape check.
    """
    if stored.numel() != ours.numel():
        return stored
    if not torch.equal(stored.reshape(-1).long(), ours.reshape(-1).long()):
        raise ValueError(
            f"checkpoint key {key} holds another scan order than the configured one; the weights were "
            "trained with another scan: set model.scan.method and model.scan.directions to that run's"
        )
    return stored.reshape(ours.shape).to(ours.dtype)


def load_weights(
    model: nn.Module, path: str | Path, log: Callable[[str], object] | None = None
) -> ConversionReport:
    """Load a checkpoint file (official or ours, any layout) into ``model`` strictly.

    Raises :class:`CheckpointMismatchError` (a ``RuntimeError``) naming the file, the offending
    keys and the config keys to check when the file does not fit the model.
    """
    state = extract_state_dict(load_file(path), path)
    try:
        converted, report = convert_state_dict(state, model.state_dict())
    except ValueError as err:
        raise CheckpointMismatchError(
            f"model.checkpoint={path} does not match the configured model: {err}"
        ) from err
    if not report.ok:
        missing, unexpected = report.missing, report.unexpected
        raise CheckpointMismatchError(
            f"model.checkpoint={path} does not match the configured model: "
            f"{len(missing)} missing keys (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3]) or '-'}). {HINT}"
        )
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:  # shape mismatches
        details = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise CheckpointMismatchError(
            f"model.checkpoint={path} does not match the configured model: {details}. {HINT}"
        ) from err
    if log is not None:
        log(f"loaded model weights (teacher included) from {path}: {report.summary()}")
    return report
