"""Logging to the console and to the run's ``log.txt``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def get_logger(run_dir: str | Path | None = None, name: str = "mambaad") -> logging.Logger:
    """A logger printing to stdout and, when ``run_dir`` is given, appending to ``run_dir/log.txt``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(run_dir) / "log.txt")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger
