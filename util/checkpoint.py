"""Checkpoint files: atomic writes and tolerant reading of the layouts users bring.

``ckpt.pth`` holds ``{"net", "optimizers", "schedulers", "epoch", "rng", ...}`` and
``net.pth`` the weights alone (ADer's layout). Writes go to a temporary file in the same
folder, are flushed to disk, then renamed, so a crash never leaves a half-written file.

Reading uses ``torch.load(weights_only=True)``: a checkpoint is a pickle, and unpickling
an arbitrary one runs whatever code it names. Besides what PyTorch allows by default
(tensors, numbers, strings, containers, ``OrderedDict``/``Counter``), only the NumPy
arrays and scalars of numeric dtypes that our checkpoints hold (NumPy's RNG state, metric
values) are allowed, and only during the load call.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util.config import ConfigError
from util.errors import DiskFullError, UserError, is_disk_full


class CheckpointError(ConfigError):
    """A checkpoint file cannot be read or holds objects outside the allow-list; the message says why."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint path that names no file; the message names the path."""


def find_checkpoint(source: str | Path) -> Path:
    """The weights file of a run folder (its ``net.pth``, else ``ckpt.pth``) or the file itself."""
    source = Path(source)
    if source.is_dir():
        checkpoint = next((p for p in (source / "net.pth", source / "ckpt.pth") if p.is_file()), None)
        if checkpoint is None:
            raise MissingCheckpointError(f"run folder {source} holds neither net.pth nor ckpt.pth")
        return checkpoint
    if source.is_file():
        return source
    raise MissingCheckpointError(f"{source} does not exist; pass a run folder or a .pth checkpoint")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            intact = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
            raise DiskFullError(path, intact + "; free some space, then resume") from err
        raise


def _numpy_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """What unpickling NumPy arrays and scalars of numeric dtypes needs (numpy 1.x and 2.x names)."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    numeric += (np.float16, np.float32, np.float64)
    dtype_classes = {type(np.dtype(t)) for t in numeric}
    aliases = [
        (func, f"{module}.multiarray.{func.__name__}")
        for func in (reconstruct, scalar)
        for module in ("numpy.core", "numpy._core")
    ]
    return [*aliases, np.ndarray, np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


_OUTSIDE_MARKERS = ("GLOBAL", "allowlisted", "Can only build", "Can only create")


def _unpickler_reason(message: str) -> str:
    """The restricted unpickler's own reason inside torch's wrapper message (without its advice)."""
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
    parts = [p.strip() for p in message.split("\n\n") if p.strip() and not p.strip().startswith(skip)]
    reason = " ".join(parts).replace("WeightsUnpickler error:", "").strip()
    return reason or message.strip()


def _outside_names(path: Path, reason: str) -> list[str]:
    """Globals a file needs beyond the allow-list (listed without unpickling), else the one in ``reason``."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be listed
        names = []
    if not names:
        found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", reason)
        names = [found.group(1) or found.group(2)] if found else []
    return names


def load_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU, allowing exactly what our checkpoints hold.

    A missing file raises :class:`MissingCheckpointError` (a ``FileNotFoundError``); a file that
    needs any other object (a pickle that would run code, a custom class) or that is damaged raises
    :class:`CheckpointError` naming the file. Nothing is ever loaded with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise MissingCheckpointError(f"checkpoint {path} {what}; check the path given in the config")
    allowed = _numpy_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(str(err))
        if not any(marker in reason for marker in _OUTSIDE_MARKERS):
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({reason}); it is not a PyTorch checkpoint, or it is "
                "truncated or corrupt"
            ) from None
        with torch.serialization.safe_globals(allowed):
            names = _outside_names(path, reason)
        raise CheckpointError(
            f"checkpoint {path} contains objects outside the allow-list"
            + (f" ({', '.join(names)})" if names else "")
            + ", so it was refused: nothing was unpickled from it and no code in it ran. Checkpoints are "
            "read with torch.load(weights_only=True), allowing tensors, numbers, strings, containers and "
            "NumPy arrays, which covers this project's net.pth/ckpt.pth and the authors' weight files. "
            "If you trust where the file comes from, re-save just its weights (a dict of tensors) "
            "with torch.save and pass that file."
        ) from None
    except Exception as err:  # torch raises several types for damaged archives
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it may be truncated or corrupt"
        ) from err


def extract_state_dict(obj: Any, path: str | Path = "<object>") -> dict[str, torch.Tensor]:
    """The model weights inside a bare state dict or a ``{"net"|"state_dict"|"model": ...}`` wrapper."""
    if isinstance(obj, dict):
        for key in ("net", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return extract_state_dict(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ValueError(f"{path} holds no model state dict (expected a dict of tensors or a 'net' entry)")


def save_rotating(obj: Any, run_dir: str | Path, tag: str, keep: int) -> Path:
    """Write ``run_dir/ckpt.pth`` atomically; keep the last ``keep`` as ``checkpoints/ckpt_<tag>.pth``.

    Tags must sort in training order (zero-padded epoch and step). The numbered copies are
    hard links of the file just written (a copy where links are not supported), so keeping
    K checkpoints costs no extra write time.
    """
    run_dir = Path(run_dir)
    latest = run_dir / "ckpt.pth"
    atomic_save(obj, latest)
    if keep <= 1:
        return latest
    folder = run_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    target = folder / f"ckpt_{tag}.pth"
    tmp = folder / f".{target.name}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(latest, tmp)
    except OSError:
        shutil.copyfile(latest, tmp)
    os.replace(tmp, target)
    for old in sorted(folder.glob("ckpt_*.pth"))[:-keep]:
        old.unlink(missing_ok=True)
    return latest


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete temporary files left by writes that a crash interrupted; returns what was removed."""
    removed = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    removed += [p for p in Path(folder).glob("checkpoints/.*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def trained_epochs(path: str | Path | None) -> int | None:
    """How many epochs the weights in ``path`` trained: a training checkpoint's ``epoch`` (the last
    completed one), else, for a run folder's ``net.pth``, that of the ``ckpt.pth`` saved with it;
    None for other files (the authors' official weights) or when it cannot be told."""
    if not path:
        return None
    try:
        path = find_checkpoint(path)
    except MissingCheckpointError:
        return None
    candidates = [path] + ([path.with_name("ckpt.pth")] if path.name == "net.pth" else [])
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            state = load_file(candidate)
        except (OSError, ValueError, RuntimeError, ConfigError):
            return None
        if isinstance(state, dict) and isinstance(state.get("epoch"), int):
            return state["epoch"]
    return None
