"""Build the configured model from a config, loading ``model.checkpoint`` when one is given."""

from __future__ import annotations

import logging
from typing import Any

import torch

from model import MODELS
from util.checkpoint import find_checkpoint
from util.config import BaseConfig, Section


def model_kwargs(cfg: BaseConfig) -> dict[str, Any]:
    """Constructor arguments of the configured model: the ``model.*`` keys as they are.

    Sections (``teacher``, ``scan``, ``lss``) become dicts; ``type`` and ``checkpoint`` are for
    :func:`build_model` itself.
    """
    return {
        k: v.to_dict() if isinstance(v, Section) else v
        for k, v in cfg.model.items()
        if k not in ("type", "checkpoint")
    }


def build_model(
    cfg: BaseConfig, log: logging.Logger, teacher_pretrained: bool | None = None
) -> torch.nn.Module:
    """The configured model, with ``model.checkpoint`` weights loaded strictly when given.

    A full checkpoint holds the teacher too, so the teacher is then neither downloaded nor
    read from ``model.teacher.checkpoint``. The model's ``load_weights`` reads the file (MambaAD's
    also reads the authors' files, see :mod:`model.mambaad.official`) and logs what it did.
    ``teacher_pretrained=False`` forces a random teacher (e.g. for counting FLOPs offline).
    """
    m = cfg.model
    full = bool(m.checkpoint)
    kwargs = model_kwargs(cfg)
    teacher = kwargs.get("teacher")  # a method without a model.teacher section has nothing to set
    if teacher is None:
        pass
    elif full:  # the checkpoint holds the teacher: neither downloaded nor read from its own file
        kwargs["teacher"] = {**teacher, "pretrained": False, "checkpoint": None}
        kwargs["teacher"]["from_model_checkpoint"] = True
    elif teacher_pretrained is False:  # a random teacher is asked for
        kwargs["teacher"] = {**teacher, "pretrained": False, "checkpoint": None}
    elif teacher_pretrained:
        kwargs["teacher"] = {**teacher, "pretrained": True}
    model = MODELS.build(
        m.type, log=log.info if full or teacher_pretrained is False else log.warning, **kwargs
    )
    if full:  # a run folder stands for its weights file
        model.load_weights(find_checkpoint(m.checkpoint), log=log.info)
    return model
