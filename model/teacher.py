"""Frozen CNN teacher: a timm ResNet cut after ``layer3`` that yields three feature maps.

MambaAD distils the teacher's multi-scale features into the student, so the teacher's
ImageNet weights matter a great deal. This machine is offline, hence the explicit
``checkpoint`` path and the loud warning when the weights are random.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

OFFLINE_HINT = (
    "pass a local ImageNet checkpoint instead, e.g. "
    "model.teacher.checkpoint=/path/to/resnet34-43635321.pth (timm 'resnet34.bt_in1k'; "
    "torchvision ResNet files with the same architecture load too)"
)


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Return the tensor dict inside a checkpoint, unwrapping ``state_dict``/``model``/``net``.

    A whole MambaAD checkpoint is accepted too: only its ``net_t.*`` entries are kept.
    """
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        wrapper = next((k for k in ("state_dict", "model", "net") if k in obj), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise ValueError(f"teacher checkpoint {path}: no state dict of tensors found in the file")
    out = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("net_t.") for k in out):
        out = {k.removeprefix("net_t."): v for k, v in out.items() if k.startswith("net_t.")}
    return out


def load_teacher_checkpoint(
    teacher: nn.Module, path: str | Path, log: Callable[[str], object] = print
) -> tuple[list[str], list[str]]:
    """Load a timm- or torchvision-format ResNet state dict from ``path`` into ``teacher``.

    Keys the feature extractor does not use (``fc.*``, ``layer4.*``) are dropped. Any other
    missing or unexpected key, or a shape mismatch, means the file is for a different
    architecture and raises ``ValueError`` naming the file. Returns the dropped keys and the
    tolerated missing keys (BatchNorm ``num_batches_tracked`` counters).
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = _unwrap_state_dict(raw, path)
    own = teacher.state_dict()
    dropped = [k for k in state if k not in own and (k.startswith("fc.") or k.startswith("layer4."))]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"teacher checkpoint {path} does not match the teacher architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched keys); "
            f"missing={missing[:8]} unexpected={unexpected[:8]} mismatched={mismatched[:4]}"
        )
    teacher.load_state_dict(state, strict=False)
    log(
        f"teacher: loaded {len(state)} tensors from {path} "
        f"(dropped {len(dropped)} unused fc/layer4 keys; {len(tolerated)} BN counters not in file)"
    )
    return dropped, tolerated


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and disable gradients for all its parameters."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_teacher(
    name: str = "resnet34",
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    out_indices: Sequence[int] = (1, 2, 3),
    log: Callable[[str], object] = print,
) -> nn.Module:
    """Build the frozen timm feature extractor ``name`` returning ``len(out_indices)`` maps.

    Weights: ``checkpoint`` (local file) wins over ``pretrained`` (timm hub download, which
    fails offline with an explanatory error); with neither, weights stay random and a
    WARNING is logged. The returned module exposes ``feature_info.channels()``.
    """
    out_indices = tuple(int(i) for i in out_indices)
    if checkpoint is not None:
        teacher = timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=False)
        if pretrained:
            log(f"teacher: both pretrained=True and checkpoint given; using the local file {checkpoint}")
        load_teacher_checkpoint(teacher, checkpoint, log=log)
    elif pretrained:
        try:
            teacher = timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=True)
        except Exception as exc:
            raise RuntimeError(
                f"could not download pretrained weights for teacher '{name}' from the timm hub "
                f"({type(exc).__name__}: {exc}). This machine is probably offline; " + OFFLINE_HINT
            ) from exc
        log(f"teacher: loaded timm pretrained weights for {name}")
    else:
        # Residual branches must not start as zero: timm zero-inits their last BN, which with
        # random weights would leave only strided 1x1 shortcuts (subsampling, blind between pixels).
        teacher = timm.create_model(
            name, features_only=True, out_indices=out_indices, pretrained=False, zero_init_last=False
        )
        teacher.is_random = True
        log(
            f"teacher '{name}' has RANDOM weights (no checkpoint, pretrained=False). "
            "Training and evaluation will run, but anomaly scores will be much worse than the "
            "paper's. To fix it, " + OFFLINE_HINT + ", or set model.teacher.pretrained=true "
            "on a machine with internet access."
        )
    return freeze(teacher)


@torch.no_grad()
def calibrate_batchnorm(teacher: nn.Module, images: Iterable[torch.Tensor], max_batches: int = 8) -> int:
    """Re-estimate the BatchNorm statistics of a (random) teacher on real images, then freeze it.

    Random weights with BN statistics at their defaults (mean 0, variance 1) give features of
    arbitrary scale per channel; averaging the batch statistics of a few training batches
    normalises every channel, which makes random-feature distillation work far better. The
    statistics live in the state dict, so saved runs reload them. Returns the batches used.
    """
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    teacher.train()
    used = 0
    try:
        for used, batch in enumerate(images, start=1):
            teacher(batch)
            if used >= max_batches:
                break
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        freeze(teacher)
    return used
