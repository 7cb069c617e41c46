"""Build the configured model from a config, loading ``model.checkpoint`` when one is given."""

from __future__ import annotations

import logging

import torch

from model import MODELS
from util.checkpoint import extract_state_dict, load_file
from util.config import BaseConfig


def build_model(cfg: BaseConfig, log: logging.Logger) -> torch.nn.Module:
    """The configured model, with ``model.checkpoint`` weights loaded strictly when given.

    A full checkpoint holds the teacher too, so the teacher is then neither downloaded nor
    read from ``model.teacher.checkpoint``.
    """
    m = cfg.model
    full = bool(m.checkpoint)
    model = MODELS.build(
        m.type,
        teacher=m.teacher.name,
        teacher_pretrained=m.teacher.pretrained and not full,
        teacher_checkpoint=None if full else m.teacher.checkpoint,
        depths=tuple(m.depths),
        scan_method=m.scan.method,
        num_directions=m.scan.directions,
        d_state=m.d_state,
        drop_path_rate=m.drop_path,
        scan_backend=m.scan.backend,
        image_size=m.image_size,
        log=log.info if full else log.warning,
    )
    if m.checkpoint:
        state = extract_state_dict(load_file(m.checkpoint), m.checkpoint)
        hint = "Check model.teacher.name, model.depths and model.scan.* against the run that saved it."
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            details = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
            raise RuntimeError(
                f"model.checkpoint={m.checkpoint} does not match the configured model: {details}. {hint}"
            ) from err
        if result.missing_keys or result.unexpected_keys:
            missing, unexpected = result.missing_keys, result.unexpected_keys
            raise RuntimeError(
                f"model.checkpoint={m.checkpoint} does not match the configured model: "
                f"{len(missing)} missing keys (e.g. {', '.join(missing[:3]) or '-'}), "
                f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3]) or '-'}). {hint}"
            )
        log.info("loaded model weights (teacher included) from %s", m.checkpoint)
    return model
