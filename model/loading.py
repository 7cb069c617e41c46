"""A trained model's network and config, loaded for inference: the PyTorch half of
:func:`mambaad.load_model`, shared with the export (:mod:`deploy.export`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from model.build import build_model
from model.ops.selective_scan import prepare_cpu
from util.checkpoint import find_checkpoint
from util.config import BaseConfig, load_config
from util.distributed import resolve_device
from util.run_config import DEFAULT_CONFIG, load_run_config


def load_network(
    checkpoint_or_run_dir: str | Path,
    config: str | Path | BaseConfig | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
    log: logging.Logger | None = None,
) -> tuple[torch.nn.Module, BaseConfig, torch.device]:
    """``(network in eval mode on device, its config, the device)`` for a checkpoint or run folder.

    The config is ``config`` (a config object, or a file, which is executed: pass only files you
    trust), else the run's ``config.json`` read as data (no code from the folder runs), else the
    paper model (``configs/defaults.py``, as for the authors' official checkpoints). Weights are
    read with ``weights_only=True`` (:func:`util.checkpoint.load_file`).
    """
    checkpoint = find_checkpoint(checkpoint_or_run_dir)
    extra = [*overrides, f"model.checkpoint={checkpoint}"]
    if isinstance(config, BaseConfig):
        cfg = config
        cfg.model.checkpoint = str(checkpoint)
    elif config is not None:
        cfg = load_config(config, extra)
    elif (checkpoint.parent / "config.json").is_file():
        cfg = load_run_config(checkpoint.parent, extra)
    else:
        cfg = load_config(DEFAULT_CONFIG, extra)
    log = log or logging.getLogger("mambaad")
    dev = resolve_device(device)
    if dev.type == "cpu":
        prepare_cpu()  # keeps the caller's torch thread count (see model.ops.selective_scan.prepare_cpu)
    net = build_model(cfg, log)
    return net.to(dev).eval(), cfg, dev
