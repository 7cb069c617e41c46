"""Build the configured model from a config, loading ``model.checkpoint`` when one is given."""

from __future__ import annotations

import logging

import torch

from model import MODELS
from model.official import load_weights
from util.config import BaseConfig


def model_kwargs(cfg: BaseConfig) -> dict:
    """Constructor arguments of the configured model, teacher options excluded."""
    m = cfg.model
    lss = m.lss
    return {
        "depths": tuple(m.depths),
        "scan_method": m.scan.method,
        "num_directions": m.scan.directions,
        "d_state": m.d_state,
        "drop_path_rate": m.drop_path,
        "scan_backend": m.scan.backend,
        "image_size": m.image_size,
        "lss_blocks": lss.blocks,
        "lss_kernels": tuple(lss.kernels),
        "lss_pointwise": lss.pointwise,
        "lss_residual": lss.residual,
    }


def build_model(
    cfg: BaseConfig, log: logging.Logger, teacher_pretrained: bool | None = None
) -> torch.nn.Module:
    """The configured model, with ``model.checkpoint`` weights loaded strictly when given.

    A full checkpoint holds the teacher too, so the teacher is then neither downloaded nor
    read from ``model.teacher.checkpoint``. Official MambaAD/ADer files load as well (see
    :mod:`model.official`); the log line lists renamed, unused and kept-from-init keys.
    ``teacher_pretrained=False`` forces a random teacher (e.g. for counting FLOPs offline).
    """
    m = cfg.model
    full = bool(m.checkpoint)
    pretrained = m.teacher.pretrained if teacher_pretrained is None else teacher_pretrained
    model = MODELS.build(
        m.type,
        teacher=m.teacher.name,
        teacher_pretrained=pretrained and not full,
        teacher_checkpoint=None if full or teacher_pretrained is False else m.teacher.checkpoint,
        log=log.info if full or teacher_pretrained is False else log.warning,
        **model_kwargs(cfg),
    )
    if full:
        load_weights(model, m.checkpoint, log=log.info)
    return model
