"""UniAD's frozen encoder (a timm EfficientNet-B4 feature extractor) and its feature alignment.

The authors' benchmark (ADer) builds ``tf_efficientnet_b4`` with timm's ``features_only=True,
out_indices=[0, 1, 2, 3]``: four maps of 24, 32, 56 and 160 channels at strides 2, 4, 8 and 16.
timm's feature model keeps the stride-32 stages (``blocks.5``, ``blocks.6``) and runs them,
although no output uses them; we build the same module, so checkpoints (and parameter counts)
match theirs, but :func:`extract_features` stops after the last stage that yields a level
(the same outputs, about 0.7 G multiply-adds less per 256x256 image).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from model.teacher import TeacherError, freeze, load_backbone_state, resolve_weights
from util.checkpoint import MissingCheckpointError, extract_state_dict, load_file

OUT_INDICES = (0, 1, 2, 3)
ALIGN_STRIDE = 16
# classification head of a full timm EfficientNet file, absent from the feature extractor
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
OFFLINE_HINT = (
    "pass a local ImageNet checkpoint instead, e.g. model.teacher.checkpoint=/path/to/"
    "tf_efficientnet_b4_ns-d6313a46.pth (timm 'tf_efficientnet_b4.ns_jft_in1k')"
)


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path, log: Callable[[str], object]) -> None:
    """Load a timm EfficientNet weights file (or a whole UniAD checkpoint's ``net_backbone.*``).

    The classifier head's keys are dropped; any other missing, unexpected or misshapen key
    means another architecture and raises :class:`TeacherError` naming the first one.
    """
    if not Path(path).is_file():
        raise MissingCheckpointError(f"model.teacher.checkpoint={path} names no file")
    state = extract_state_dict(load_file(path), path)
    if any(k.startswith("net_backbone.") for k in state):
        prefix = "net_backbone."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    load_backbone_state(backbone, state, path, log)


def build_backbone(
    name: str,
    pretrained: bool,
    checkpoint: str | Path | None,
    log: Callable[[str], object] = print,
    from_model_checkpoint: bool = False,
) -> nn.Module:
    """The frozen timm feature extractor ``name`` (four levels, strides 2 to 16).

    Weights: ``checkpoint`` (a local file) wins over ``pretrained`` (timm's hub, online only);
    with neither they stay random (``is_random`` is set, so BatchNorm statistics can be
    calibrated) unless a full model checkpoint brings them (``from_model_checkpoint``).
    """
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise TeacherError(f"model.teacher.name={name!r} is no timm model; see timm.list_models()")

    def create(weights: bool) -> nn.Module:
        return timm.create_model(name, pretrained=weights, features_only=True, out_indices=OUT_INDICES)

    if checkpoint:
        backbone = create(False)
        load_backbone_checkpoint(backbone, checkpoint, log)
    elif pretrained:
        resolved, file = resolve_weights(name)
        try:
            backbone = create(True)
        except Exception as exc:
            raise TeacherError(
                f"could not download pretrained weights for backbone '{name}' ({resolved}, {file}): "
                f"{type(exc).__name__}: {exc}. Offline? {OFFLINE_HINT}"
            ) from exc
        log(f"backbone: timm pretrained weights {resolved} ({file})")
    else:
        backbone = create(False)
        backbone.is_random = not from_model_checkpoint
        if from_model_checkpoint:
            log(f"backbone '{name}': weights from the model checkpoint (model.checkpoint)")
        else:
            log(
                f"backbone '{name}' has RANDOM weights (no checkpoint, pretrained=False); UniAD will "
                f"train and test, but far below the paper. To fix it, {OFFLINE_HINT}."
            )
    strides = list(backbone.feature_info.reduction())
    if strides[-1] != ALIGN_STRIDE or len(strides) != len(OUT_INDICES):
        raise TeacherError(f"backbone '{name}' gives feature strides {strides}; UniAD needs 4 ending at 16")
    return freeze(backbone)


def extract_features(backbone: nn.Module, imgs: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's feature maps, without running stages after the last one that yields a map.

    Equals ``backbone(imgs)`` for timm EfficientNet feature models whose levels are block outputs
    (``blocks.N``); any other backbone runs its own forward.
    """
    names = backbone.feature_info.module_name()
    layout_ok = all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks"))
    if not layout_ok or getattr(backbone, "feature_hooks", None) is not None:
        return list(backbone(imgs))
    if not all(n.startswith("blocks.") and n.count(".") == 1 for n in names):
        return list(backbone(imgs))
    wanted = [int(n.split(".")[1]) for n in names]
    x = backbone.bn1(backbone.conv_stem(imgs))
    feats = []
    for i, block in enumerate(backbone.blocks[: max(wanted) + 1]):
        x = block(x)
        if i in wanted:
            feats.append(x)
    return feats


class FeatureAlign(nn.Module):
    """UniAD's MFCN: every level resized to the stride-16 grid and concatenated (no parameters).

    Bilinear with ``align_corners=True`` (``nn.UpsamplingBilinear2d``, as the authors), also for
    the finer levels, which it subsamples without low-pass filtering.
    """

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[-1].shape[-2:]
        resized = [
            f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=True)
            for f in feats
        ]
        return torch.cat(resized, dim=1)
