"""Re-test a finished run and draw its qualitative results and curves.

python tools/visualize.py runs/mambaad_demo_20261125-044450
python tools/visualize.py RUN_DIR --out figures/ data.root=/other/path/to/data

Loads RUN_DIR/config.json (the resolved config the run used) and RUN_DIR/net.pth, evaluates the
test set once in test mode, and writes into a new run folder (under --out, default the run's
``output_dir``): ``vis/<class>.png`` (image / ground truth / heat map / prediction of the worst
and best cases per class), ``curves/<class>_{roc,pr,pro}.png``, metrics.json/csv and the log.
Extra ``key=value`` arguments override config values as in run.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from util.cli import report_error  # noqa: E402
from util.config import ConfigError  # noqa: E402
from util.run_config import load_run_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder with config.json and net.pth")
    p.add_argument("--out", help="folder for the new test run (default: the run's output_dir)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    p.add_argument("overrides", nargs="*", help="config overrides such as data.root=PATH")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    weights = run_dir / "net.pth"
    try:
        if not weights.is_file():
            raise ConfigError(f"{weights} does not exist; the run has not saved weights yet")
        cfg = load_run_config(run_dir, args.overrides)
    except Exception as err:
        return report_error(err, args)
    cfg.model.checkpoint = str(weights)
    cfg.trainer.resume = None
    cfg.evaluator.plots = True
    cfg.vis = True
    if args.out:
        cfg.output_dir = args.out

    from data.default_ad import read_rgb
    from trainer import TRAINERS

    trainer = None
    try:
        trainer = TRAINERS.build(cfg.trainer.type, cfg, mode="test")
        trainer.test()
        if not (trainer.run_dir / "vis").is_dir():
            # The trainer's evaluate() did not ask for figures: draw them from the maps it still holds.
            trainer.evaluator.compute(out_dir=trainer.run_dir, read_image=read_rgb)
    except Exception as err:  # e.g. the run's data.root moved: one paragraph, the log keeps the traceback
        return report_error(err, args, log=trainer.log if trainer is not None else None)
    if not (trainer.run_dir / "vis").is_dir():
        trainer.log.warning("no vis/ written: the trainer does not pass img_paths to the evaluator")
    trainer.log.info("figures in %s", trainer.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
