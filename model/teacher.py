"""Frozen CNN teacher: a timm ResNet cut after ``layer3`` that yields three feature maps.

MambaAD distils the teacher's multi-scale features into the student, so the teacher's
ImageNet weights matter a great deal. This machine is offline, hence the explicit
``checkpoint`` path and the loud warning when the weights are random.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from util.checkpoint import MissingCheckpointError, load_file
from util.config import options
from util.errors import UserError

OFFLINE_HINT = (
    "pass a local ImageNet checkpoint instead, e.g. "
    "model.teacher.checkpoint=/path/to/resnet34-43635321.pth (timm 'resnet34.bt_in1k'; "
    "torchvision ResNet files with the same architecture load too)"
)

# The ImageNet weights the authors' code loads per teacher architecture, as timm pretrained tags.
# Their configs name the files (ADer / MambaAD ``checkpoint_path``): resnet34-43635321.pth is
# ``bt_in1k``; resnet18-5c106cde.pth is ``tv_in1k`` (timm now fetches resnet18-f37072fd.pth, the
# same tensors re-saved by torchvision, pytorch/vision#2068); wide_resnet50_racm-8234f177.pth is
# ``racm_in1k``. No config of theirs names a ResNet50 file; ``a1_in1k`` (resnet50_a1_0-14fe96d1.pth)
# is what timm's plain ``resnet50`` loaded in the timm they used, and still loads.
AUTHORS_TEACHER_TAGS: dict[str, str] = {
    "resnet18": "tv_in1k",
    "resnet34": "bt_in1k",
    "resnet50": "a1_in1k",
    "wide_resnet50_2": "racm_in1k",
}


class TeacherError(UserError, RuntimeError):
    """The teacher cannot be built as configured (unknown name, weights not available)."""


def resolve_weights(name: str) -> tuple[str, str]:
    """``(architecture.tag, weights file)`` that timm's ``pretrained=True`` loads for teacher ``name``.

    A name without a tag gets timm's default tag, which need not be the authors' (timm 1.0 resolves
    ``resnet34`` to ``resnet34.a1_in1k``). Reads timm's registry only: nothing is downloaded.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise TeacherError(f"timm has no pretrained weights for teacher {name!r}; check model.teacher.name")
    file = cfg.url.rsplit("/", 1)[-1] if cfg.url else (cfg.file or cfg.hf_hub_filename or cfg.hf_hub_id)
    return f"{cfg.architecture}.{cfg.tag}", str(file)


def _tag_advice(name: str, resolved: str) -> str:
    """A note when ``name`` resolves to other weights than the authors' for its architecture."""
    arch = resolved.split(".", 1)[0]
    wanted = AUTHORS_TEACHER_TAGS.get(arch)
    if wanted is None or resolved == f"{arch}.{wanted}":
        return ""
    return (
        f"; the authors' code loads {arch}.{wanted} ({resolve_weights(f'{arch}.{wanted}')[1]}): "
        f"set model.teacher.name={arch}.{wanted} to reproduce the paper"
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


def _first_misfit(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """The first key, in the model's order and then the file's, where ``state`` does not fit ``own``."""
    for key, tensor in own.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in state:
            return f"{key}: missing from the file"
        if state[key].shape != tensor.shape:
            return f"{key}: shape {tuple(state[key].shape)} in the file, {tuple(tensor.shape)} in the model"
    extra = next(k for k in state if k not in own)
    return f"{extra}: in the file but not in the model"


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
        raise MissingCheckpointError(
            f"model.teacher.checkpoint={path} names no file; pass a timm or torchvision weights file "
            "of the teacher (e.g. resnet34-43635321.pth) or leave it unset"
        )
    raw = load_file(path)  # weights_only=True; a file needing more is a clean CheckpointError
    state = _unwrap_state_dict(raw, path)
    own = teacher.state_dict()
    dropped = [k for k in state if k not in own and (k.startswith("fc.") or k.startswith("layer4."))]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        arch = (getattr(teacher, "pretrained_cfg", None) or {}).get("architecture", "?")
        raise ValueError(
            f"teacher checkpoint {path} does not fit the teacher backbone {arch!r}: first mismatching "
            f"key {_first_misfit(own, state)} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} of another shape); pass a file of that architecture or set "
            f"model.teacher.name to the file's"
        )
    teacher.load_state_dict(state, strict=False)
    log(
        f"teacher: loaded {len(state)} tensors from {path} "
        f"(dropped {len(dropped)} unused fc/layer4 keys; {len(tolerated)} BN counters not in file)"
    )
    return dropped, tolerated


def load_backbone_state(
    backbone: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, log: Callable[[str], object]
) -> None:
    """Load ``state``, a backbone's weights read from ``path`` (``model.teacher.checkpoint``), into
    ``backbone``: any missing key (BatchNorm counters aside), unexpected or misshapen one means
    another architecture and raises :class:`TeacherError` naming the first."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        first = (missing + unexpected + misshapen)[0]
        raise TeacherError(
            f"model.teacher.checkpoint={path} does not fit the backbone ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(misshapen)} misshapen keys; first: {first}); pass a "
            "weights file of model.teacher.name's architecture"
        )
    backbone.load_state_dict(state, strict=False)
    log(f"backbone: loaded {len(state)} tensors from {path}")


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and disable gradients for all its parameters."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass(frozen=True)
class TeacherOptions:
    """The ``model.teacher`` config section: timm name (with the weights' tag) and where weights come from.

    ``calibrate_batches``: a random teacher (neither ``pretrained`` nor ``checkpoint``) gets
    BatchNorm statistics from this many training batches before training; 0 disables it.
    """

    name: str = "resnet34"
    pretrained: bool = False
    checkpoint: str | None = None
    calibrate_batches: int = 8
    # set by model.build.build_model, not a config key: a full model checkpoint (model.checkpoint)
    # brings the teacher's weights after the model is built
    from_model_checkpoint: bool = False


def teacher_options(value: str | TeacherOptions | Mapping[str, Any] | None) -> TeacherOptions:
    """The ``model.teacher`` section as :class:`TeacherOptions`: a timm name, a dict or options."""
    return options(TeacherOptions, {"name": value} if isinstance(value, str) else value)


def build_teacher(
    name: str = "resnet34.bt_in1k",
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    out_indices: Sequence[int] = (1, 2, 3),
    log: Callable[[str], object] = print,
    from_model_checkpoint: bool = False,
) -> nn.Module:
    """Build the frozen timm feature extractor ``name`` returning ``len(out_indices)`` maps.

    ``name`` is a timm model name, with the pretrained tag that picks the weights
    (``resnet34.bt_in1k``, the authors' file; see :data:`AUTHORS_TEACHER_TAGS`). Weights:
    ``checkpoint`` (local file) wins over ``pretrained`` (timm hub download, which fails offline
    with an explanatory error; the resolved tag and file are logged); with neither, weights stay
    random and a WARNING is logged, unless ``from_model_checkpoint`` says that a full model
    checkpoint loads them after building. The returned module exposes ``feature_info.channels()``.
    """
    out_indices = tuple(int(i) for i in out_indices)
    if checkpoint is not None:
        teacher = timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=False)
        if pretrained:
            log(f"teacher: both pretrained=True and checkpoint given; using the local file {checkpoint}")
        load_teacher_checkpoint(teacher, checkpoint, log=log)
    elif pretrained:
        resolved, file = resolve_weights(name)
        try:
            teacher = timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=True)
        except Exception as exc:
            raise TeacherError(
                f"could not download pretrained weights for teacher '{name}' ({resolved}, {file}) from "
                f"the timm hub ({type(exc).__name__}: {exc}). This machine is probably offline; "
                + OFFLINE_HINT
            ) from exc
        log(f"teacher: timm pretrained weights {resolved} ({file}){_tag_advice(name, resolved)}")
    else:
        # Residual branches must not start as zero: timm zero-inits their last BN, which with
        # random weights would leave only strided 1x1 shortcuts (subsampling, blind between pixels).
        if not timm.is_model(name.split(".")[0]):
            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
            raise TeacherError(
                f"model.teacher.name={name!r} is no timm model"
                + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()")
            )
        teacher = timm.create_model(
            name, features_only=True, out_indices=out_indices, pretrained=False, zero_init_last=False
        )
        teacher.is_random = not from_model_checkpoint
        if from_model_checkpoint:
            log(f"teacher '{name}': weights from the model checkpoint (model.checkpoint)")
            return freeze(teacher)
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
