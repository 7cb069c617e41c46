"""Tabulate finished runs: mean metrics of each run's final evaluation plus the config keys that differ.

    python tools/collect.py runs/sweeps/mambaad_mvtec_table3_scans
    python tools/collect.py runs/A runs/B --format latex --digits 1
    python tools/collect.py runs/sweeps/mambaad_mvtec_table2_backbone_depth --cost   # + params, GFLOPs

Each argument is a run folder (holding ``metrics.json``) or a folder searched recursively
for them (a sweep folder). Rows are labelled by the path below the argument (the sweep's
combination name); values are x100. Columns: the config keys whose values differ between
the runs, the seven metrics of the ``mean`` row of the ``final`` entry, and mAD.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.config import flat_keys
from util.metrics import METRIC_NAMES

IGNORED_KEYS = ("output_dir", "trainer.resume", "config_file")
_STAMP = re.compile(r"_\d{8}-\d{6}(-\d+)?$")


def find_runs(paths: list[Path]) -> list[tuple[str, Path]]:
    """``(label, run folder)`` for every ``metrics.json`` at or below each path, sorted per path."""
    found: list[tuple[str, Path]] = []
    for root in paths:
        if (root / "metrics.json").is_file():
            found.append((root.name, root))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is neither a run folder nor a folder of runs")
        runs = sorted(p.parent for p in root.rglob("metrics.json"))
        if not runs:
            raise FileNotFoundError(f"no metrics.json below {root}; did the runs finish an evaluation?")
        labels = []
        for run in runs:
            parts = list(run.relative_to(root).parts)
            if len(parts) > 1 and _STAMP.search(parts[-1]):
                parts = parts[:-1]  # <sweep>/<combination>/<config>_<timestamp>: label by combination
            labels.append("/".join(parts))
        for label, run in zip(labels, runs, strict=True):  # several runs of one combination: full path
            found.append((label if labels.count(label) == 1 else str(run.relative_to(root)), run))
    return found


def _flat_config(run: Path) -> dict[str, Any]:
    path = run / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    data.pop("_overridden", None)
    return flat_keys(data)


def mean_metrics(run: Path) -> dict[str, float]:
    """The final evaluation's mean over classes (x100) with mAD, from ``run/metrics.json``."""
    data = json.loads((run / "metrics.json").read_text())
    results = (data.get("final") or {}).get("results") or {}
    if not results:
        raise ValueError(f"{run / 'metrics.json'} has no final results")
    if "mean" in results:
        mean = dict(results["mean"])
    else:
        classes = list(results.values())
        mean = {m: sum(c.get(m, math.nan) for c in classes) / len(classes) for m in METRIC_NAMES}
    out = {m: 100.0 * float(mean.get(m, math.nan)) for m in METRIC_NAMES}
    out["mAD"] = sum(out.values()) / len(METRIC_NAMES)
    return out


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys (in first-seen order) whose values are not the same in every run."""
    keys: list[str] = []
    for cfg in configs:
        keys += [k for k in cfg if k not in keys]
    diff = []
    for key in keys:
        if key in IGNORED_KEYS or key.startswith("_"):
            continue
        values = {json.dumps(cfg.get(key), default=str, sort_keys=True) for cfg in configs}
        if len(values) > 1:
            diff.append(key)
    return diff


def cost_of(run: Path) -> dict[str, float]:
    """Parameters (M) and GFLOPs of the model a run's config describes (see tools/flops.py)."""
    from mambaad import config_from_run
    from tools.flops import measure

    result = measure(config_from_run(run))
    return {"Params(M)": result["params_m"]["total"], "FLOPs(G)": result["gflops"]["total"]}


def build_table(runs: list[tuple[str, Path]], cost: bool = False) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: label, differing config keys, [params, FLOPs,] metrics, mAD."""
    configs = [_flat_config(run) for _, run in runs]
    keys = differing_keys(configs)
    header = ["run", *keys]
    costs = []
    if cost:
        header += ["Params(M)", "FLOPs(G)"]
        cache: dict[str, dict[str, float]] = {}
        for (_, run), cfg in zip(runs, configs, strict=True):
            arch = {k: v for k, v in cfg.items() if k.startswith(("model.", "data.image_size"))}
            model_key = json.dumps(arch, default=str)
            if model_key not in cache:
                cache[model_key] = cost_of(run)
            costs.append(cache[model_key])
    header += [*METRIC_NAMES, "mAD"]
    rows = []
    for i, ((label, run), cfg) in enumerate(zip(runs, configs, strict=True)):
        metrics = mean_metrics(run)
        row: list[Any] = [label, *(cfg.get(k) for k in keys)]
        if cost:
            row += [costs[i]["Params(M)"], costs[i]["FLOPs(G)"]]
        rows.append(row + [metrics[m] for m in (*METRIC_NAMES, "mAD")])
    return header, rows


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def render(header: list[str], rows: list[list[Any]], fmt: str, digits: int = 2) -> str:
    """The table as ``markdown``, ``csv`` or ``latex`` (booktabs) text."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(cells)
        return buf.getvalue().rstrip("\n")
    numeric = [
        all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)
        for i in range(len(header))
    ]
    if fmt == "markdown":
        align = ["---:" if n else ":---" for n in numeric]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    if fmt == "latex":

        def esc(text: str) -> str:
            return re.sub(r"([_%&#$])", r"\\\1", text)

        spec = "".join("r" if n else "l" for n in numeric)
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(esc(h) for h in header) + " \\\\"]
        lines.append("\\midrule")
        lines += [" & ".join(esc(c) for c in r) + " \\\\" for r in cells]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}; use markdown, csv or latex")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders holding runs (a sweep)")
    parser.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown")
    parser.add_argument(
        "--digits", type=int, default=1, help="decimals of values (default 1, as in the paper)"
    )
    parser.add_argument("--cost", action="store_true", help="add each model's params (M) and GFLOPs")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the table; returns the process exit code."""
    args = parse_args(argv)
    try:
        runs = find_runs(args.runs)
        header, rows = build_table(runs, cost=args.cost)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = render(header, rows, args.format, args.digits)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
