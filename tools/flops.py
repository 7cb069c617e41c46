"""Parameters and GFLOPs of a configured model at its input size (batch 1), fvcore-style.

    python tools/flops.py -c configs/mambaad_mvtec.py
    python tools/flops.py -c configs/mambaad_mvtec.py model.teacher.name=resnet18 model.depths=[2,2,2,2]

Counting follows fvcore (which the paper's figures come from): one FLOP per multiply-add
for convolutions, linear layers, matmuls and einsums (PyTorch's ``FlopCounterMode`` counts
2 per multiply-add, so its counts are halved); normalisation layers add ``numel`` x 5
(LayerNorm/GroupNorm/InstanceNorm with affine parameters), x 4 (without) or, for BatchNorm
in eval mode, x 2 (x 1 without affine); element-wise ops, pooling and activations count 0.
The selective scan is a custom op that plain fvcore cannot see, and the paper's 8.3 G
leaves it out (our count without it matches); it is reported on its own line, counted
analytically as in VMamba's fvcore handle: ``9 * B * L * D * N + B * D * L`` per call
(``D`` = K directions x d_inner, ``N`` = d_state; ``B * D * L`` is the ``D * u`` skip term),
and added in "total with scans". The teacher is built with random weights (no download;
FLOPs do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model.mambaad.ss2d as ss2d
from data import as_hw
from model.base import AnomalyModel
from model.build import build_model
from model.ops.selective_scan import forced_backend
from util.cli import add_config_args, config_from_args, print_config, report_error


def selective_scan_flops(batch: int, length: int, channels: int, d_state: int, with_d: bool = True) -> int:
    """fvcore-style FLOPs of one selective scan: ``9*B*L*D*N`` (+ ``B*D*L`` for the ``D`` skip)."""
    flops = 9 * batch * length * channels * d_state
    return flops + batch * channels * length if with_d else flops


def norm_flops(module: nn.Module, inp: torch.Tensor) -> int:
    """fvcore's count for a normalisation layer applied to ``inp``."""
    n = inp.numel()
    affine = getattr(module, "weight", None) is not None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
        return n * (2 if affine else 1)
    return n * (5 if affine else 4)


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@contextmanager
def _counting(root: nn.Module, tally: dict[str, int]) -> Iterator[None]:
    """Count ``root``'s norms (hooks; per module name under ``norm:<name>``, all under ``norm``) and
    selective scans (analytic, not executed) into ``tally``."""

    def fake_scan(u: torch.Tensor, delta: torch.Tensor, a_mat: torch.Tensor, *args: Any, **kwargs: Any):
        b, d, length = u.shape
        has_d = (args[2] if len(args) > 2 else kwargs.get("D")) is not None
        tally["scan"] += selective_scan_flops(b, length, d, a_mat.shape[1], with_d=has_d)
        return torch.zeros_like(u)

    def hook(name: str) -> Callable[..., None]:
        def count(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            flops = norm_flops(module, inputs[0])
            tally["norm"] += flops
            tally[f"norm:{name}"] = tally.get(f"norm:{name}", 0) + flops

        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in root.named_modules() if isinstance(m, _NORMS)]
    try:
        # the unfused scan path, whose projections are the model's own arithmetic (the fused
        # CPU path's block-diagonal products would count zeros) and whose scans are counted here
        with mock.patch.object(ss2d, "selective_scan_fn", fake_scan), forced_backend("ref"):
            yield
    finally:
        for h in handles:
            h.remove()


def _count(module: nn.Module, fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """``(fvcore FLOPs without scans, analytic scan FLOPs, output)`` of ``fn()`` running ``module``."""
    tally = {"norm": 0, "scan": 0}
    with _counting(module, tally), FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops() // 2 + tally["norm"], tally["scan"], out


def _under(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


@torch.no_grad()
def model_flops(model: AnomalyModel, image_size: int | tuple[int, int]) -> dict[str, int]:
    """FLOPs for one image in eval mode: per cost part (``model.cost_parts()``: for MambaAD
    ``teacher``, ``bottleneck``, ``decoder``), ``total`` (fvcore's count of ``forward``, which skips
    the selective scan, as in the paper), ``scan`` (analytic) and ``total_with_scan``.

    One pass counts everything; an operation belongs to the part whose modules ran it, so a method
    needs no code here (its forward may call a part's submodules directly).
    """
    h, w = as_hw(image_size)
    model = model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    tally = {"norm": 0, "scan": 0}
    with _counting(model, tally), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, h, w))
    root = type(model).__name__
    per_module = {
        k.removeprefix(root + "."): sum(v.values()) for k, v in counter.get_flop_counts().items() if k != root
    }
    out: dict[str, int] = {}
    for label, module in model.cost_parts().items():
        part = names[id(module)]
        inside = [k for k in per_module if _under(k, part)]
        top = [k for k in inside if not any(o != k and _under(k, o) for o in inside)]  # counted once
        norms = sum(v for k, v in tally.items() if k.startswith("norm:") and _under(k[5:], part))
        out[label] = sum(per_module[k] for k in top) // 2 + norms
    out["total"] = counter.get_total_flops() // 2 + tally["norm"]
    out["scan"] = tally["scan"]
    out["total_with_scan"] = out["total"] + out["scan"]
    return out


def measure(cfg: Any) -> dict[str, dict[str, float]]:
    """``{"params_m": {...}, "gflops": {...}}`` for a loaded config (random teacher, no checkpoint)."""
    cfg.model.checkpoint = None
    log = logging.getLogger("mambaad.flops")
    log.propagate = False  # the random-teacher warning does not matter for counting
    model = build_model(cfg, log, teacher_pretrained=False)
    params = model.parameter_counts()
    flops = model_flops(model, cfg.data.image_size)
    return {
        "params_m": {k: params[k] / 1e6 for k in ("total", *model.cost_parts())},
        "gflops": {k: v / 1e9 for k, v in flops.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_args(parser, overrides_help="config overrides such as model.depths=[2,2,2,2]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the parameter and FLOP counts; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print_config(cfg)
            return 0
        torch.manual_seed(0)
        result = measure(cfg)
    except Exception as err:
        return report_error(err, args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    h, w = as_hw(cfg.data.image_size)
    print(f"{cfg.name}: input {h}x{w}, batch 1 (fvcore counting, 1 FLOP = 1 multiply-add)")
    print("| part | params (M) | GFLOPs |")
    print("|---|---:|---:|")
    for key in result["params_m"]:
        print(f"| {key} | {result['params_m'][key]:.2f} | {result['gflops'][key]:.2f} |")
    g = result["gflops"]
    print(f"| selective scans (analytic, not in the paper's count) | | {g['scan']:.2f} |")
    print(f"| total with scans | | {g['total_with_scan']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
