"""Seeding, numeric modes (deterministic, fast CUDA, full fp32) and the RNG states a resumed run restores."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_determinism() -> None:
    """Deterministic kernels where PyTorch has them (warns where it has none); no cuDNN autotuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def enable_fast_cuda(tf32: bool = False) -> None:
    """cuDNN autotuning (as the authors' runs); with ``tf32`` also TF32 tensor-core matmuls and
    convolutions (fp32 inputs rounded to ~1e-3 inside the product: faster on Ampere and later, but
    not PyTorch's default for matmuls, so not what the authors ran)."""
    torch.backends.cudnn.benchmark = True
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """Plain fp32 on ``device_type`` inside (no autocast, no TF32); TF32 settings restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rng_state() -> dict[str, Any]:
    """Every RNG state a resumed run needs to continue identically.

    On CUDA only the current device's generator is kept (each rank uses one GPU), so a run
    saved on a machine with more GPUs resumes on one with fewer.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA state onto the current device).

    Checkpoints of earlier versions hold a list with every GPU's state; the current device's
    entry (or the first) is used.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list | tuple):
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)
