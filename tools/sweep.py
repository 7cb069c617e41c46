"""Run a grid of config overrides, one run folder per combination (ablation tables).

    python tools/sweep.py --config configs/mambaad_mvtec.py --grid configs/sweeps/table3_scans.yaml
    python tools/sweep.py --config configs/mambaad_demo.py --grid GRID.yaml --dry-run trainer.epochs=2
    python tools/sweep.py --config configs/mambaad_mvtec.py --grid GRID.yaml --emit slurm > sweep.sbatch

A grid file is YAML, either a plain mapping ``key: [values]`` (every combination, in file
order) or a mapping with any of ``grid`` (such a mapping), ``rows`` (a list of named rows
``{name: ..., key: value, ...}`` for tables that are not Cartesian; a row's ``config: FILE``
runs that config instead of ``--config``, so one grid can compare methods and data sets) and
``fixed`` (overrides for every run); rows x grid when both are given. Combination ``NAME`` runs as

    python run.py -c CONFIG [extra overrides] [fixed] [combination] output_dir=OUT/NAME

where ``OUT`` is ``--out`` (default ``runs/sweeps/<config>_<grid>``) and ``NAME`` is the
row name and/or ``<key>-<value>`` parts, so it is the same every time. A combination is known by
the whole config it resolves to: its folder's finished run (``metrics.json`` whose final epoch
is ``trainer.epochs``) is skipped and an unfinished one with a ``ckpt.pth`` continues with
``trainer.resume`` only when the run's ``config.json`` holds the same settings; a run with other
settings stops the sweep before anything runs, naming the keys. ``OUT/sweep.json`` lists the
combinations that ran with these settings, each with its state and run folder.
``tools/collect.py OUT`` then tabulates the results.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.run_folder import IGNORED_ON_RESUME
from util.cli import add_config_args, config_from_args, report_error
from util.config import BaseConfig, ConfigError, config_to_dict, diff_configs, flat_keys
from util.errors import UsageError, make_folder

REPO = Path(__file__).resolve().parent.parent
_RESERVED = ("grid", "rows", "fixed")
_MAX_NAME = 96


class GridError(UsageError, ValueError):
    """A grid file is malformed; the message names the file and what to change."""


@dataclass
class Combination:
    """One run of a sweep: its folder name, its ``key=value`` overrides and the config file its row
    names (None: the sweep's ``--config``)."""

    name: str
    overrides: list[str] = field(default_factory=list)
    config: str | None = None


def format_value(value: Any) -> str:
    """A YAML value as the text of a ``key=value`` override (``[3,4,6,3]``, ``None``, ``True``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) if not isinstance(v, str) else repr(v) for v in value) + "]"
    if isinstance(value, dict):
        raise TypeError(f"a dict cannot be one override value: {value!r}; use dotted keys instead")
    return str(value)


def _name_part(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_name_part(v) for v in value) or "empty"
    text = re.sub(r"[^A-Za-z0-9._]+", "-", str(value)).strip("-")
    return text or "x"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Last component of each dotted key, or the whole key (dots as '-') when that is ambiguous."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k.replace(".", "-") for k, leaf in zip(keys, leaves)}


def _check_name(name: str) -> str:
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: _MAX_NAME - 9]}-{digest}"


def _as_mapping(obj: Any, what: str, path: Path) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise GridError(f"{path}: {what} must be a mapping of dotted config keys, got {type(obj).__name__}")
    return obj


def load_grid(path: str | Path) -> list[Combination]:
    """Expand a grid file into its combinations, in file order; names are unique and stable."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"grid file {path} is not valid YAML: {err}") from err
    if isinstance(data, list):
        data = {"rows": data}
    data = _as_mapping(data, "the top level", path)
    if not any(k in data for k in _RESERVED):
        data = {"grid": data}
    unknown = [k for k in data if k not in _RESERVED]
    if unknown:
        raise GridError(
            f"{path}: unknown top-level keys {unknown}; with grid/rows/fixed, put config keys inside them"
        )
    grid = _as_mapping(data.get("grid"), "'grid'", path)
    fixed = _as_mapping(data.get("fixed"), "'fixed'", path)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: grid key {key!r} needs a non-empty list of values, got {values!r}")
    rows = data.get("rows") or [{}]
    if not isinstance(rows, list):
        raise GridError(f"{path}: 'rows' must be a list of mappings, each with a 'name'")
    fixed_overrides = [f"{k}={format_value(v)}" for k, v in fixed.items()]
    short = _short_keys(list(grid))
    combos: list[Combination] = []
    for i, row in enumerate(rows):
        row = dict(_as_mapping(row, f"row {i}", path))
        row_name = row.pop("name", None)
        row_config = row.pop("config", None)
        if row_config is not None and (not isinstance(row_config, str) or not (REPO / row_config).is_file()):
            raise GridError(
                f"{path}: row {i} names config {row_config!r}, which is no file of this repository"
            )
        if data.get("rows") and row_name is None:
            row_name = "_".join(f"{_short_keys(list(row))[k]}-{_name_part(v)}" for k, v in row.items())
        row_overrides = [f"{k}={format_value(v)}" for k, v in row.items()]
        for values in itertools.product(*grid.values()):
            parts = [f"{short[k]}-{_name_part(v)}" for k, v in zip(grid, values)]
            name = "_".join(p for p in ([_name_part(row_name)] if row_name else []) + parts) or "default"
            grid_overrides = [f"{k}={format_value(v)}" for k, v in zip(grid, values)]
            overrides = fixed_overrides + row_overrides + grid_overrides
            combos.append(Combination(_check_name(name), overrides, row_config))
    names = [c.name for c in combos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GridError(f"{path}: combinations share the names {dupes}; give each row a distinct 'name'")
    return combos


# keys that do not change what a run computes, or that name where it is: not compared
BOOKKEEPING = (*IGNORED_ON_RESUME, "trainer.resume_changes", "name")


def differing_keys(saved: dict[str, Any], wanted: BaseConfig) -> list[str]:
    """``key: saved -> wanted`` for each setting of a run folder's ``config.json`` that the
    combination's resolved config would set otherwise (a key the combination sets explicitly
    counts also when the saved config lacks it)."""
    old, new = flat_keys(saved), flat_keys(config_to_dict(wanted))
    keys = [k for k in diff_configs(saved, config_to_dict(wanted)) if not k.startswith(BOOKKEEPING)]
    keys = [k for k in keys if (k in old and k in new) or k in wanted.overridden]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def run_status(folder: Path) -> tuple[str, Path | None]:
    """``("done", run)``, ``("partial", run with ckpt.pth)`` or ``("new", None)`` for a combination folder."""
    partial = None
    if not folder.is_dir():
        return "new", None
    for metrics in [*folder.glob("metrics.json"), *sorted(folder.glob("*/metrics.json"))]:
        run = metrics.parent
        try:
            final = json.loads(metrics.read_text()).get("final") or {}
            epochs = json.loads((run / "config.json").read_text())["trainer"]["epochs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if final.get("epoch") is not None and final["epoch"] >= epochs:
            return "done", run
    for ckpt in [*folder.glob("ckpt.pth"), *sorted(folder.glob("*/ckpt.pth"))]:
        partial = ckpt.parent
    return ("partial", partial) if partial is not None else ("new", None)


def _repo_relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _config_of(combo: Combination, args: argparse.Namespace) -> str:
    """The config file a combination runs: its row's ``config``, else the sweep's ``--config``."""
    return str(REPO / combo.config) if combo.config else str(args.config)


def build_command(
    config: str, combo: Combination, extra: list[str], out: Path, resume: Path | None
) -> list[str]:
    """The ``python run.py ...`` command line of one combination, to run from the repository root."""
    cmd = ["python", "run.py", "-c", _repo_relative(Path(config)), *extra, *combo.overrides]
    cmd.append(f"output_dir={_repo_relative(out / combo.name)}")
    if resume is not None:
        cmd.append(f"trainer.resume={_repo_relative(resume)}")
    return cmd


def _emit(kind: str, commands: list[list[str]], nproc: int) -> str:
    lines = [shlex.join(c) for c in commands]
    if kind == "commands":
        return "\n".join([f"cd {shlex.quote(str(REPO))}", *lines])
    if kind == "torchrun":
        tr = [shlex.join(["torchrun", f"--nproc_per_node={nproc}", *c[1:]]) for c in commands]
        return "\n".join([f"cd {shlex.quote(str(REPO))}", *tr])
    body = "\n".join(f"  {shlex.quote(line)}" for line in lines)
    return (
        "#!/bin/bash\n"
        "#SBATCH --job-name=mambaad-sweep\n"
        f"#SBATCH --array=0-{len(commands) - 1}\n"
        f"#SBATCH --gres=gpu:{nproc}\n"
        f"#SBATCH --chdir={REPO}\n"
        "# one array task per combination; adjust partition, time and memory for your cluster\n"
        f"CMDS=(\n{body}\n)\n"
        'eval "${CMDS[$SLURM_ARRAY_TASK_ID]}"\n'
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", required=True, type=Path, help="grid YAML (see configs/sweeps/)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/sweeps/<config>_<grid>")
    parser.add_argument("--dry-run", action="store_true", help="print what would run or be skipped")
    parser.add_argument("--jobs", type=int, default=1, help="combinations run at the same time (default 1)")
    parser.add_argument(
        "--emit",
        choices=("commands", "slurm", "torchrun"),
        default=None,
        help="print the pending commands (shell lines, a Slurm array script, or torchrun lines) instead",
    )
    parser.add_argument("--nproc", type=int, default=1, help="GPUs per run for --emit torchrun/slurm")
    add_config_args(
        parser, print_config=False, overrides_help="overrides for every run, e.g. trainer.epochs=100"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Expand, then run (or print) the pending combinations; returns the process exit code."""
    args = parse_args(argv)
    try:
        combos = load_grid(args.grid)
        if not Path(args.config).is_file():
            config_from_args(args)  # raises the ConfigError that names the missing file
        configs = {}
        for combo in combos:  # every combination must be a valid config before anything runs
            try:
                own = argparse.Namespace(**{**vars(args), "config": _config_of(combo, args)})
                configs[combo.name] = config_from_args(own, combo.overrides)
            except ConfigError as err:
                raise GridError(f"combination {combo.name}: {err}") from err
    except Exception as err:
        return report_error(err, args)
    out = (args.out or REPO / "runs" / "sweeps" / f"{Path(args.config).stem}_{args.grid.stem}").resolve()
    pending: list[tuple[Combination, list[str]]] = []
    finished: dict[str, Path] = {}
    changed: list[str] = []
    for combo in combos:
        status, run = run_status(out / combo.name)
        if run is not None:
            try:
                saved = json.loads((run / "config.json").read_text())
            except (OSError, ValueError) as err:
                changed.append(f"{combo.name} ({run}): its config.json cannot be read ({err})")
                continue
            diffs = differing_keys(saved, configs[combo.name])
            if diffs:
                changed.append(f"{combo.name} ({run}): {'; '.join(diffs)}")
                continue
        if status == "done":
            finished[combo.name] = run
            if args.emit is None:
                print(f"skip {combo.name}: finished in {run} with the same settings")
            continue
        resume = run if status == "partial" else None
        cmd = build_command(_config_of(combo, args), combo, args.overrides, out, resume)
        pending.append((combo, cmd))
    if changed:
        return report_error(
            UsageError(
                f"{out} already holds runs of this grid with other settings, which a table would "
                f"mix with the new ones; nothing was run. {' | '.join(changed)}. Sweep into another "
                "folder (--out), or delete those run folders to run them again"
            ),
            args,
        )
    if args.emit is not None:
        if pending:
            print(_emit(args.emit, [cmd for _, cmd in pending], args.nproc))
        return 0
    print(f"{len(combos)} combinations, {len(pending)} to run, results in {out}")
    if args.dry_run:
        for combo, cmd in pending:
            print(f"would run {combo.name}: {shlex.join(cmd)}")
        return 0
    make_folder(out, "--out")
    overrides = {c.name: c.overrides for c in combos}
    ran: dict[str, dict[str, Any]] = {
        name: {"overrides": overrides[name], "state": "finished", "run": str(run)}
        for name, run in finished.items()
    }
    lock = threading.Lock()

    def record(name: str, state: str) -> None:
        """``sweep.json``: only the combinations that ran (or had run) with these settings."""
        with lock:
            _, run = run_status(out / name)
            ran[name] = {"overrides": overrides[name], "state": state, "run": str(run) if run else None}
            info = {"config": args.config, "grid": str(args.grid), "extra": args.overrides, "runs": ran}
            (out / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")

    def launch(item: tuple[Combination, list[str]]) -> tuple[str, int]:
        combo, cmd = item
        folder = out / combo.name
        folder.mkdir(parents=True, exist_ok=True)
        print(f"start {combo.name}", flush=True)
        log_path = folder / "stdout.txt"
        with open(log_path, "a") as log:
            proc = subprocess.run(
                [sys.executable, *cmd[1:]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False
            )
        code = proc.returncode
        state = "done" if code == 0 else f"FAILED (exit {code})"
        record(combo.name, "finished" if code == 0 else f"failed (exit {code})")
        print(f"{state} {combo.name}; log: {log_path}", flush=True)
        return combo.name, code

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(launch, pending))
    failed = [name for name, code in results if code != 0]
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(results)} runs finished; tabulate with: python tools/collect.py {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
