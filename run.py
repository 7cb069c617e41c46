"""Train or evaluate an anomaly detector from a config file.

python run.py -c configs/mambaad_mvtec.py                      # train (+ periodic tests)
python run.py -c configs/mambaad_mvtec.py trainer.epochs=100   # any key can be overridden
python run.py -c configs/mambaad_mvtec.py -m test model.checkpoint=runs/.../net.pth
"""

from __future__ import annotations

import argparse
import sys

from util.cli import add_config_args, config_from_args, print_config, report_error
from util.config import ConfigError
from util.distributed import shutdown
from util.signals import TrainingInterruptedError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments: config file, mode, and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--mode", choices=("train", "test"), default="train")
    add_config_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: usage error, 1: other error)."""
    args = parse_args(argv)
    trainer = None
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print_config(cfg)
            return 0
        if args.mode == "test" and not cfg.model.checkpoint:
            raise ConfigError("-m test needs model.checkpoint=PATH (a net.pth or ckpt.pth)")

        from trainer import TRAINERS

        trainer = TRAINERS.build(cfg.trainer.type, cfg, mode=args.mode)
        try:
            if args.mode == "train":
                trainer.train()
            else:
                trainer.test()
        except TrainingInterruptedError as stop:
            trainer.log.warning("%s", stop)
            return stop.exit_code
        except KeyboardInterrupt:
            hint = ""
            if args.mode == "train" and (trainer.run_dir / "ckpt.pth").is_file():
                again = " ".join([*args.overrides, f"trainer.resume={trainer.run_dir}"])
                hint = f"; continue from the last checkpoint with: python run.py -c {args.config} {again}"
            trainer.log.warning("interrupted%s", hint)
            return 130
        trainer.log.info("done; results in %s", trainer.run_dir)
        return 0
    except Exception as err:
        return report_error(err, args, log=trainer.log if trainer is not None else None)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
