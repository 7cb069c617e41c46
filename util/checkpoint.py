"""Checkpoint files: atomic writes and tolerant reading of the layouts users bring.

``ckpt.pth`` holds ``{"net", "optimizer", "scheduler", "epoch", "rng", ...}`` and
``net.pth`` the weights alone (ADer's layout). Writes go to a temporary file in the same
folder, are flushed to disk, then renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | Path) -> Any:
    """``torch.load`` on CPU with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path given in the config")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for damaged archives
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({err}); it may be truncated or corrupt"
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
