"""The config command line shared by ``run.py`` and the tools: arguments, loading, error reporting.

Every entry point that takes a config spells it the same way (``-c/--config FILE``, then
``key=value`` overrides, ``--print-config``, ``--debug``) and reports a failure the same way
(:func:`util.errors.report`: one paragraph for user errors, the exit status of the error class,
a traceback with ``--debug`` or ``MAMBAAD_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from util.config import BaseConfig, config_to_dict, load_config
from util.errors import debug_requested, report


def add_config_args(
    parser: argparse.ArgumentParser,
    required: bool = True,
    print_config: bool = True,
    config_help: str = "config file, e.g. configs/mambaad_mvtec.py",
    overrides_help: str = "config overrides such as trainer.epochs=10",
) -> None:
    """Add ``-c/--config``, ``--print-config`` (when ``print_config``), ``--debug`` and the overrides.

    ``required=False`` is for tools whose config defaults to a run folder's (``args.config`` None).
    """
    parser.add_argument("-c", "--config", required=required, default=None, help=config_help)
    if print_config:
        parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def config_from_args(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> BaseConfig:
    """The config of ``args.config`` with ``args.overrides`` and then ``extra_overrides`` applied.

    Raises :class:`util.config.ConfigError` for a missing file, an unknown key or a bad value.
    """
    return load_config(args.config, [*args.overrides, *extra_overrides])


def print_config(cfg: BaseConfig) -> None:
    """Print the resolved config as JSON (what ``--print-config`` shows)."""
    print(json.dumps(config_to_dict(cfg), indent=2, default=str))


def report_error(err: BaseException, args: argparse.Namespace, log: logging.Logger | None = None) -> int:
    """:func:`util.errors.report` for a command line: tracebacks with ``--debug`` or ``MAMBAAD_DEBUG``."""
    return report(err, args.debug or debug_requested([]), log=log)
