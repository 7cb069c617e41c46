"""Inference and training-step time of several methods, side by side in one run (paper Table 5).

    python tools/bench_methods.py                  # MambaAD, RD4AD, UniAD, SimpleNet on MVTec settings
    python tools/bench_methods.py --image-size 128 --repeats 3 --batch 2
    python tools/bench_methods.py --configs configs/mambaad_mvtec.py configs/rd4ad_mvtec.py

Each method is built from its config with a random teacher (no download: speed does not depend
on the weights) on ``--device``. Measurements alternate between the methods, repeat by repeat,
so that a noisy machine slows each alike; the table gives the median of ``--repeats`` timed runs
after one warm-up and each method's ratio to the first one. Inference: ``predict`` on one image
(maps and scores, as the evaluation computes them). Training step: the method's loss terms on a
batch of ``--batch`` images through the trainer's hooks, backward, and a step of each optimiser.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loss import LOSSES
from model.build import build_model
from model.ops.selective_scan import prepare_cpu
from trainer.optim import build_optimizers
from util.cli import report_error
from util.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = (
    "configs/mambaad_mvtec.py",
    "configs/rd4ad_mvtec.py",
    "configs/uniad_mvtec.py",
    "configs/simplenet_mvtec.py",
    "configs/destseg_mvtec.py",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class MethodBench:
    """One method built from its config, with an inference call and a training step to time."""

    def __init__(self, config: str, image_size: int, batch: int, device: torch.device) -> None:
        cfg = load_config(REPO / config, [f"data.image_size={image_size}"])
        cfg.model.checkpoint = None
        log = logging.getLogger("mambaad.bench")
        log.propagate = False
        torch.manual_seed(0)
        self.name = cfg.name
        self.model = build_model(cfg, log, teacher_pretrained=False).to(device)
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.criterion = LOSSES.build(cfg.loss.type, **{k: v for k, v in cfg.loss.items() if k != "type"})
        self.optimizers = [opt for opt, _ in build_optimizers(self.model, cfg.optim).values()]
        self.stage = self.model.stage(1, cfg.trainer.epochs)
        self.model.enter_stage(self.stage)
        g = torch.Generator().manual_seed(1)
        self.one = torch.randn(1, 3, image_size, image_size, generator=g).to(device)
        shape = (batch, 3, image_size, image_size)
        self.batch = {
            "img": torch.randn(*shape, generator=g).to(device),
            # what methods trained on synthesized anomalies (DeSTSeg) also read
            "augmented_image": torch.randn(*shape, generator=g).to(device),
            "img_mask": (torch.rand(batch, 1, image_size, image_size, generator=g) > 0.8).float().to(device),
        }

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model.predict(self.one)

    def train_step(self) -> None:
        self.model.train()
        inputs = self.model.train_inputs(self.batch)
        terms = self.model.loss_terms(self.model(*inputs), self.batch, self.criterion)
        sum(terms.values()).backward()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def run(
    configs: Sequence[str], image_size: int, batch: int, repeats: int, device: torch.device
) -> list[dict]:
    """Median inference and training-step seconds per method, measured alternately."""
    prepare_cpu()
    benches = [MethodBench(c, image_size, batch, device) for c in configs]
    times: dict[str, dict[str, list[float]]] = {b.name: {"infer": [], "train": []} for b in benches}
    for repeat in range(repeats + 1):  # the first round warms up and is not kept
        for bench in benches:
            infer, train = _timed(bench.infer, device), _timed(bench.train_step, device)
            if repeat:
                times[bench.name]["infer"].append(infer)
                times[bench.name]["train"].append(train)
    rows = []
    for bench in benches:
        t = times[bench.name]
        rows.append(
            {
                "config": bench.name,
                "params_m": bench.params_m,
                "infer_s": statistics.median(t["infer"]),
                "train_step_s": statistics.median(t["train"]),
            }
        )
    for row in rows:
        row["infer_ratio"] = row["infer_s"] / rows[0]["infer_s"]
        row["train_ratio"] = row["train_step_s"] / rows[0]["train_step_s"]
    return rows


def markdown(rows: list[dict[str, Any]], image_size: int, batch: int) -> str:
    """The side-by-side table, ratios against the first method."""
    lines = [
        f"| config | params (M) | inference, 1 image {image_size}px (s) | x first | "
        f"training step, batch {batch} (s) | x first |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['params_m']:.1f} | {r['infer_s']:.3f} | {r['infer_ratio']:.2f} | "
            f"{r['train_step_s']:.3f} | {r['train_ratio']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="one config per method")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="training-step batch (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the table; returns the process exit code."""
    args = parse_args(argv)
    try:
        rows = run(args.configs, args.image_size, args.batch, args.repeats, torch.device(args.device))
    except Exception as err:
        return report_error(err, args)
    print(markdown(rows, args.image_size, args.batch))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
