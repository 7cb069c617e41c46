"""SimpleNet's frozen backbone: a whole timm ResNet (torchvision's module names) and its feature maps.

ADer builds torchvision's ``wide_resnet50_2`` (``tv_wide_resnet50_2``, ImageNet file
``wide_resnet50_2-95faca4d.pth``, timm's ``wide_resnet50_2.tv_in1k``) and keeps all of it,
``layer4`` and ``fc`` included, so its checkpoints and its 72.8 M parameters hold them. Only
``layer2`` and ``layer3`` feed the method: :func:`extract_features` stops after the last layer
asked for (ADer runs the whole network and discards the rest; the outputs are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from model.teacher import TeacherError, freeze, load_backbone_state, resolve_weights
from util.checkpoint import MissingCheckpointError, extract_state_dict, load_file

LAYERS = ("layer1", "layer2", "layer3", "layer4")
OFFLINE_HINT = (
    "pass a local ImageNet checkpoint instead, e.g. model.teacher.checkpoint=/path/to/"
    "wide_resnet50_2-95faca4d.pth (torchvision's file, timm 'wide_resnet50_2.tv_in1k')"
)


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path, log: Callable[[str], object]) -> None:
    """Load a torchvision/timm ResNet weights file (or a whole SimpleNet checkpoint's backbone)
    strictly; a file of another architecture raises :class:`TeacherError` naming its first misfit."""
    if not Path(path).is_file():
        raise MissingCheckpointError(f"model.teacher.checkpoint={path} names no file")
    state = extract_state_dict(load_file(path), path)
    for prefix in ("backbone.", "model_backbone."):  # ours, ADer's
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    load_backbone_state(backbone, state, path, log)


def build_backbone(
    name: str,
    pretrained: bool,
    checkpoint: str | Path | None,
    log: Callable[[str], object] = print,
    from_model_checkpoint: bool = False,
) -> nn.Module:
    """The frozen, whole timm ResNet ``name`` (classifier included, as ADer's module).

    Weights: ``checkpoint`` (a local file) wins over ``pretrained`` (timm's hub, online only);
    with neither they stay random (``is_random`` is set, so BatchNorm statistics can be
    calibrated) unless a full model checkpoint brings them (``from_model_checkpoint``).
    """
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise TeacherError(f"model.teacher.name={name!r} is no timm model; see timm.list_models()")
    if checkpoint:
        backbone = timm.create_model(name, pretrained=False)
        load_backbone_checkpoint(backbone, checkpoint, log)
    elif pretrained:
        resolved, file = resolve_weights(name)
        try:
            backbone = timm.create_model(name, pretrained=True)
        except Exception as exc:
            raise TeacherError(
                f"could not download pretrained weights for backbone '{name}' ({resolved}, {file}): "
                f"{type(exc).__name__}: {exc}. Offline? {OFFLINE_HINT}"
            ) from exc
        log(f"backbone: timm pretrained weights {resolved} ({file})")
    else:
        # timm zero-initialises each residual branch's last BN; random weights would then pass
        # only the strided shortcuts, so keep torchvision's initialisation (non-zero)
        backbone = timm.create_model(name, pretrained=False, zero_init_last=False)
        backbone.is_random = not from_model_checkpoint
        if from_model_checkpoint:
            log(f"backbone '{name}': weights from the model checkpoint (model.checkpoint)")
        else:
            log(
                f"backbone '{name}' has RANDOM weights (no checkpoint, pretrained=False); SimpleNet "
                f"will train and test, but far below the paper. To fix it, {OFFLINE_HINT}."
            )
    if not all(hasattr(backbone, a) for a in ("conv1", "bn1", "act1", "maxpool", *LAYERS)):
        raise TeacherError(f"backbone '{name}' is not a ResNet (conv1, bn1, layer1-4); SimpleNet needs one")
    return freeze(backbone)


def extract_features(backbone: nn.Module, imgs: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """The outputs of ``layers`` (names of ``layer1``-``layer4``) for ``imgs``, in that order; the
    network runs only up to the deepest of them."""
    last = max(LAYERS.index(name) for name in layers)
    x = backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(imgs))))
    outputs = {}
    for name in LAYERS[: last + 1]:
        x = getattr(backbone, name)(x)
        outputs[name] = x
    return [outputs[name] for name in layers]


@torch.no_grad()
def ader_probe(backbone: nn.Module, image_size: tuple[int, int]) -> None:
    """Move every BatchNorm's running statistics as ADer's SimpleNet does when it is built.

    ADer measures the backbone's channel counts by running one all-ones image of the input size
    through it while it is still in training mode, so each BatchNorm's running mean and variance
    move 10 % (its momentum) toward that image's; every ADer SimpleNet, trained or tested, has
    these statistics. The backbone is frozen (eval mode) again afterwards.
    """
    backbone.train()
    try:
        backbone(torch.ones(1, 3, *image_size, device=next(backbone.parameters()).device))
    finally:
        freeze(backbone)
