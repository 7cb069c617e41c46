"""Tabulate finished runs: mean metrics of each run's final evaluation plus the config keys that differ.

    python tools/collect.py runs/sweeps/mambaad_mvtec_table3_scans
    python tools/collect.py runs/A runs/B --format latex --digits 1
    python tools/collect.py runs/sweeps/mambaad_mvtec_table2_backbone_depth --cost   # + params, GFLOPs
    python tools/collect.py runs/mambaad_visa_20261125-101500 --paper   # next to the paper's numbers
    python tools/collect.py runs/sweeps/mambaad_demo_mmad --over seed   # mean ± half range over seeds

Each argument is a run folder (holding ``metrics.json``) or a folder searched recursively
for them (a sweep folder). Rows are labelled by the path below the argument (the sweep's
combination name); values are x100. Columns: the run's state and epochs (``E/N``: the final
evaluation's epoch of ``trainer.epochs``), the config keys whose values differ between the
runs, the seven metrics of the ``mean`` row of the ``final`` entry, and mAD. Only finished runs
are tabulated (``--unfinished`` lists the others too); every run left out, and every file that
cannot be read, is named below the table.

``--paper`` puts each metric next to the published one (``configs/paper_results.json``) and
the difference (run - paper): per class and mean for a data-set run (the data set follows from
the run's config name, or ``--paper DATASET``), the mean for a sweep combination named as a
row of paper Tables 2-4 (``configs/sweeps/``). A run with only some of the data set's classes
(or others besides) is compared over the classes both have, the paper's mean recomputed from its
per-class values, and the missing and foreign classes are named. It compares like with like:
the run's table in the paper's protocol (MambaAD's rows: ``mambaad``; the other methods' rows,
from ADer's benchmark: ``ader``) where the run recorded one (an ``ader`` / ``mambaad`` run also
records ``exact``), and says which protocol it compared, the run's evaluator mode and how many
epochs the scored weights trained (for a ``-m test`` run, as its metrics record them).
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

from evaluation.metrics_exact import METRIC_NAMES
from util.config import flat_keys

IGNORED_KEYS = ("output_dir", "trainer.resume", "config_file")
PAPER_RESULTS = Path(__file__).resolve().parent.parent / "configs" / "paper_results.json"
ABLATION_TABLES = ("table2", "table3", "table4")
PaperSection = tuple[list[str], list[str], list[list[Any]]]  # notes, header, rows
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
    if not path.is_file():  # without it the run's settings, epochs and data set are unknown
        raise FileNotFoundError(f"{path} is missing, so the run's settings are unknown")
    data = json.loads(path.read_text())
    data.pop("_overridden", None)
    return flat_keys(data)


def _number(value: Any) -> float:
    """A metric from metrics.json: null (undefined) or missing becomes NaN."""
    return math.nan if value is None else float(value)


def _mean(values: list[Any]) -> float:
    """Mean of the defined values (NaN when none is)."""
    defined = [v for v in map(_number, values) if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def final_tables(run: Path) -> dict[str, dict[str, Any]]:
    """The final evaluation's tables by protocol: ``results`` under its ``protocol`` (older runs: the
    config's ``evaluator.mode``) and, where recorded, the ``exact`` table beside it."""
    final = json.loads((run / "metrics.json").read_text()).get("final") or {}
    protocol = final.get("protocol")
    if protocol is None:  # older runs: the config's mode (a folder without config.json: exact)
        config = run / "config.json"
        protocol = _flat_config(run).get("evaluator.mode", "exact") if config.is_file() else "exact"
    tables = {protocol: final.get("results") or {}}
    extra = final.get("exact")
    if isinstance(extra, dict) and extra.get("results"):
        tables.setdefault(extra.get("protocol", "exact"), extra["results"])
    return tables


def compared_protocol(run: Path, wanted: str) -> str:
    """``wanted`` where the run recorded a table in it, else the protocol of its reported results."""
    tables = final_tables(run)
    return wanted if wanted in tables else next(iter(tables))


def paper_protocol(method: str, paper: dict[str, Any]) -> str:
    """The protocol of the paper's numbers for ``method``: MambaAD's own evaluator for its rows;
    the other methods' Table 1 rows come from ADer's benchmark (ADEval on: ``ader``)."""
    return paper["evaluation"]["mode"] if method == "MambaAD" else "ader"


def mean_metrics(run: Path, protocol: str | None = None) -> dict[str, float]:
    """The final evaluation's mean over classes (x100) with mAD, from ``run/metrics.json``, in
    ``protocol`` (None: the reported results; see :func:`final_tables`)."""
    tables = final_tables(run)
    results = tables.get(protocol) if protocol is not None else None
    results = results or next(iter(tables.values()))
    if not results:
        raise ValueError(f"{run / 'metrics.json'} has no final results")
    if "mean" in results:
        mean = dict(results["mean"])
    else:
        classes = list(results.values())
        mean = {m: _mean([c.get(m) for c in classes]) for m in METRIC_NAMES}
    out = {m: 100.0 * _number(mean.get(m)) for m in METRIC_NAMES}
    out["mAD"] = sum(out.values()) / len(METRIC_NAMES)
    return out


def run_state(run: Path) -> tuple[str, str]:
    """``(state, epochs)`` of a run: ``finished`` / ``interrupted`` / ``failed`` / ``running`` from its
    ``status.json`` (older folders: finished when the final evaluation is of the last epoch, else
    ``unfinished``), and ``E/N`` (the final evaluation's epoch of ``trainer.epochs``) or ``test``.
    A run without ``config.json`` raises FileNotFoundError (its settings are unknown)."""
    config = _flat_config(run)
    final = json.loads((run / "metrics.json").read_text()).get("final") or {}
    status_path = run / "status.json"
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    total, epoch = config.get("trainer.epochs"), final.get("epoch")
    if status.get("mode") == "test" or (epoch is None and final.get("results")):
        return status.get("state", "finished"), "test"
    epochs = f"{epoch}/{total}"
    if status.get("state"):
        return status["state"], epochs
    done = isinstance(epoch, int) and isinstance(total, int) and epoch >= total
    return ("finished" if done else "unfinished"), epochs


def readable_runs(runs: list[tuple[str, Path]]) -> tuple[list[tuple[str, Path]], list[str]]:
    """The runs whose ``config.json`` and ``metrics.json`` can be read, and a note for each other."""
    ok, notes = [], []
    for label, run in runs:
        try:  # run_state reads config.json and metrics.json, mean_metrics the results
            run_state(run)
            mean_metrics(run)
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
            notes.append(f"left out {label}: cannot read {run} ({type(err).__name__}: {err})")
            continue
        ok.append((label, run))
    return ok, notes


def finished_runs(
    runs: list[tuple[str, Path]], keep_unfinished: bool = False
) -> tuple[list[tuple[str, Path]], list[str]]:
    """The finished runs (all, with ``keep_unfinished``), and a note for each run left out."""
    kept, notes = [], []
    for label, run in runs:
        state, epochs = run_state(run)
        if state == "finished" or keep_unfinished:
            kept.append((label, run))
        else:
            notes.append(f"left out {label}: {state}, evaluated at epoch {epochs} (--unfinished lists it)")
    return kept, notes


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys (in first-seen order) whose values are not the same in every run; a key that
    only some runs have (another method's ``model.*`` settings) is left out, ``model.type`` says it."""
    keys: list[str] = []
    for cfg in configs:
        keys += [k for k in cfg if k not in keys]
    diff = []
    for key in keys:
        if key in IGNORED_KEYS or key.startswith("_") or not all(key in cfg for cfg in configs):
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


def costs_of(runs: list[tuple[str, Path]], configs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """:func:`cost_of` each run, counted once per distinct model (its ``model.*`` keys and input size)."""
    cache: dict[str, dict[str, float]] = {}
    costs = []
    for (_, run), cfg in zip(runs, configs, strict=True):
        arch = {k: v for k, v in cfg.items() if k.startswith(("model.", "data.image_size"))}
        model_key = json.dumps(arch, default=str)
        if model_key not in cache:
            cache[model_key] = cost_of(run)
        costs.append(cache[model_key])
    return costs


def build_table(runs: list[tuple[str, Path]], cost: bool = False) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: label, state, epochs, differing config keys, [params, FLOPs,] metrics, mAD."""
    configs = [_flat_config(run) for _, run in runs]
    keys = differing_keys(configs)
    header = ["run", "state", "epochs", *keys]
    costs = costs_of(runs, configs) if cost else []
    if cost:
        header += ["Params(M)", "FLOPs(G)"]
    header += [*METRIC_NAMES, "mAD"]
    rows = []
    for i, ((label, run), cfg) in enumerate(zip(runs, configs, strict=True)):
        metrics = mean_metrics(run)
        settings = (f"{v:g}" if isinstance(v, float) else v for v in (cfg.get(k) for k in keys))  # as set
        row: list[Any] = [label, *run_state(run), *settings]
        if cost:
            row += [costs[i]["Params(M)"], costs[i]["FLOPs(G)"]]
        rows.append(row + [metrics[m] for m in (*METRIC_NAMES, "mAD")])
    return header, rows


def average_over(header: list[str], rows: list[list[Any]], key: str) -> tuple[list[str], list[list[Any]]]:
    """Rows that differ only in config ``key`` (e.g. ``seed``) merged: numbers as ``(mean, spread)``
    with spread = half the range, an ``n`` column with the number of runs merged, and the label
    of the first run without its ``key`` part (as tools/sweep.py names it: ``seed-0``)."""
    if key not in header:
        raise ValueError(f"--over {key}: the runs do not differ in {key!r}; differing keys: {header[1:]}")
    if "state" in header:  # merged rows are of finished runs (see finished_runs): no state columns
        drop = [header.index("state"), header.index("epochs")]
        header = [h for i, h in enumerate(header) if i not in drop]
        rows = [[v for i, v in enumerate(row) if i not in drop] for row in rows]
    at = header.index(key)
    first_metric = next(i for i, h in enumerate(header) if h in (*METRIC_NAMES, "Params(M)", "FLOPs(G)"))
    groups: dict[str, list[list[Any]]] = {}
    for row in rows:
        ident = json.dumps([v for i, v in enumerate(row[1:first_metric], 1) if i != at], default=str)
        groups.setdefault(ident, []).append(row)
    out_header = [h for i, h in enumerate(header) if i != at]
    out_header.insert(first_metric - 1, "n")
    out = []
    for members in groups.values():
        names = "|".join(re.escape(k) for k in (key.rsplit(".", 1)[-1], key.replace(".", "-")))
        label = re.sub(rf"[_/]?(?:{names})-[^_/]*", "", str(members[0][0])) or str(members[0][0])
        merged: list[Any] = [label, *(v for i, v in enumerate(members[0][1:first_metric], 1) if i != at)]
        merged.append(len(members))
        for i in range(first_metric, len(header)):
            values = [v for v in map(_number, (m[i] for m in members)) if not math.isnan(v)]
            spread = (max(values) - min(values)) / 2 if values else math.nan
            merged.append((_mean(values), spread))
        out.append(merged)
    return out_header, out


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        mean, spread = value
        return "nan" if math.isnan(mean) else f"{mean:.{digits}f} ± {spread:.{digits}f}"
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
        all(isinstance(r[i], (int, float, tuple)) and not isinstance(r[i], bool) for r in rows)
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


def load_paper(path: Path = PAPER_RESULTS) -> dict[str, Any]:
    """The published numbers (``configs/paper_results.json``)."""
    return json.loads(path.read_text(encoding="utf-8"))


def _class_key(name: str) -> str:
    """Class names compared loosely: ``Metal Nut`` = ``metal_nut``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _with_mad(values: list[float] | None, mad: float | None = None) -> list[float]:
    """Seven paper metrics plus mAD (the published one, else their mean); nan when unknown."""
    if values is None:
        return [math.nan] * (len(METRIC_NAMES) + 1)
    return [*values, sum(values) / len(values) if mad is None else mad]


def class_metrics(run: Path, protocol: str | None = None) -> dict[str, dict[str, float]]:
    """Each class's final metrics (x100, with mAD) from ``run/metrics.json``, then ``mean``, in
    ``protocol`` (None: the reported results)."""
    tables = final_tables(run)
    results = (tables.get(protocol) if protocol is not None else None) or next(iter(tables.values()))
    out = {}
    for cls, values in results.items():
        if cls != "mean":
            row = {m: 100.0 * float(values.get(m, math.nan)) for m in METRIC_NAMES}
            out[cls] = {**row, "mAD": sum(row.values()) / len(METRIC_NAMES)}
    out["mean"] = mean_metrics(run, protocol)
    return out


def paper_dataset(cfg: dict[str, Any], paper: dict[str, Any], run: Path, chosen: str = "auto") -> str:
    """The paper data set a run is compared with: ``chosen``, else the one whose config the run used."""
    datasets = paper["datasets"]
    if chosen != "auto":
        if chosen not in datasets:
            raise ValueError(
                f"--paper {chosen}: no such data set in the paper; use one of {', '.join(datasets)}"
            )
        return chosen
    name = cfg.get("name")
    found = [ds for ds, entry in datasets.items() if entry["config"] == name]
    found = found or [ds for ds in datasets if str(name).split("_", 1)[-1] == ds]  # <method>_<data set>
    if not found:
        raise ValueError(
            f"{run}: cannot tell which paper data set config {name!r} ran; pass --paper DATASET "
            f"(one of {', '.join(datasets)})"
        )
    return found[0]


def ablation_row(label: str, run: Path, paper: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(table, row)`` of paper Tables 2-4 named as the run's sweep combination (label or folder)."""
    for name in (label.split("/")[0], run.parent.name):
        for table in ABLATION_TABLES:
            row = paper["tables"][table]["rows"].get(name)
            if row is not None:
                return table, row
    return None


def _compare(label: str, ours: dict[str, float], theirs: list[float]) -> list[Any]:
    row: list[Any] = [label]
    for m, paper_value in zip((*METRIC_NAMES, "mAD"), theirs, strict=True):
        row += [ours.get(m, math.nan), paper_value, ours.get(m, math.nan) - paper_value]
    return row


def _compare_header(first: str) -> list[str]:
    return [first, *(f"{m}{suffix}" for m in (*METRIC_NAMES, "mAD") for suffix in ("", " paper", " diff"))]


def run_note(label: str, run: Path, cfg: dict[str, Any], paper: dict[str, Any]) -> str:
    """The evaluator mode and epochs a run used, and which protocol is compared: the paper's where
    the run recorded a table in it (a mambaad or ader run records exact too, not the reverse)."""
    mode = cfg.get("evaluator.mode", "exact")
    wanted = paper_protocol(method_of(cfg, paper), paper)
    used = compared_protocol(run, wanted)
    verdict = "as the paper" if used == wanted else f"NOT the paper's protocol {wanted}"
    return f"run {label}: evaluator.mode={mode}; compared: protocol {used} ({verdict}), {epochs_note(run)}"


def epochs_note(run: Path) -> str:
    """How long the scored weights trained: the run's epochs, or for a ``-m test`` run the epochs
    its metrics record of the checkpoint it scored (``weights_epoch``)."""
    state, epochs = run_state(run)
    if epochs != "test":
        return f"{state}, epoch {epochs}"
    final = json.loads((run / "metrics.json").read_text()).get("final") or {}
    trained = final.get("weights_epoch")
    return (
        f"-m test of weights trained for {trained if trained is not None else 'an unknown number of'} epochs"
    )


def paper_note(paper: dict[str, Any]) -> str:
    """How the paper's numbers were evaluated and trained."""
    ev = paper["evaluation"]
    return (
        f"paper: evaluator.mode={ev['mode']} ({ev['protocol']}); {ev['epochs']} epochs "
        f"({ev['epochs_note']}); diff = run - paper; a paper mAD the paper does not print is the mean "
        f"of its seven values"
    )


def _same_classes(
    per_class: dict[str, dict[str, float]], entry: dict[str, Any], notes: list[str]
) -> tuple[dict[str, dict[str, float]], bool]:
    """A run's classes that the paper reports, with the mean over them alone, and whether they are
    all of the paper's; notes name the paper's classes the run lacks and the run's the paper lacks."""
    paper_keys = {_class_key(c): c for c in entry["classes"]}
    ours = {c: v for c, v in per_class.items() if c != "mean" and _class_key(c) in paper_keys}
    foreign = [c for c in per_class if c != "mean" and _class_key(c) not in paper_keys]
    missing = [name for key, name in paper_keys.items() if key not in {_class_key(c) for c in ours}]
    if not missing and not foreign:
        return per_class, True
    if not ours:
        raise ValueError(f"the run has none of the paper's {entry['name']} classes ({', '.join(foreign)})")
    mean = {m: sum(v[m] for v in ours.values()) / len(ours) for m in METRIC_NAMES}
    mean["mAD"] = sum(mean[m] for m in METRIC_NAMES) / len(METRIC_NAMES)
    notes.append(
        f"mean over the {len(ours)} class(es) both have, the paper's from its per-class values"
        + (f"; not in this run: {', '.join(missing)}" if missing else "")
        + (f"; not in the paper, left out: {', '.join(foreign)}" if foreign else "")
    )
    return {**ours, "mean": mean}, False


def method_of(cfg: dict[str, Any], paper: dict[str, Any]) -> str:
    """The paper's name (Table 1 row) of the method a run trained, from its ``model.type``."""
    kind = str(cfg.get("model.type", "mambaad"))
    return paper["methods"].get(kind, kind)


def table1_row(
    label: str, run: Path, cfg: dict[str, Any], paper: dict[str, Any], ds: str, notes: list[str]
) -> list[Any]:
    """A run's mean next to its method's Table 1 row on data set ``ds``; a MambaAD run on only some
    of the classes gets the paper's mean over those, another method's run (whose per-class values
    the paper's appendix holds but this file does not) no paper values, with a note."""
    method = method_of(cfg, paper)
    entry = paper["datasets"][ds]
    per_class = class_metrics(run, compared_protocol(run, paper_protocol(method, paper)))
    printed = paper["tables"]["table1"]["rows"].get(ds, {}).get(method)  # seven metrics and mAD
    theirs = _with_mad(None) if printed is None else list(printed)
    if ds != "coco":
        subset_notes: list[str] = []
        per_class, same = _same_classes(per_class, entry, subset_notes)
        ours = {_class_key(c) for c in per_class}
        if not same and method == "MambaAD":
            shared = [v for c, v in entry["classes"].items() if _class_key(c) in ours]
            theirs = _with_mad([sum(col) / len(col) for col in zip(*shared, strict=True)])
            notes.append(f"{label}: {subset_notes[0]}")
        elif not same:
            theirs = _with_mad(None)
            notes.append(
                f"{label}: not all of {entry['name']}'s classes, and only {method}'s mean is recorded"
            )
    return [entry["name"], method, *_compare(label, per_class["mean"], theirs)]


def paper_sections(
    runs: list[tuple[str, Path]], paper: dict[str, Any], chosen: str = "auto"
) -> list[PaperSection]:
    """``(notes, header, rows)`` per table: one per MambaAD data-set run (per class), Table 1 (the
    mean of every data-set run beside its method's row; when there are several runs or another
    method's), one for all ablation-table runs."""
    sections = []
    ablation: list[list[Any]] = []
    ablation_notes: list[str] = []
    table1: list[list[Any]] = []
    table1_notes: list[str] = []
    for label, run in runs:
        cfg = _flat_config(run)
        match = ablation_row(label, run, paper) if chosen == "auto" else None
        if match is not None:
            table, row = match
            mean = mean_metrics(run, compared_protocol(run, paper_protocol("MambaAD", paper)))
            ablation.append([table, *_compare(label, mean, _with_mad(row["metrics"]))])
            ablation_notes.append(run_note(label, run, cfg, paper))
            continue
        ds = paper_dataset(cfg, paper, run, chosen)
        table1.append(table1_row(label, run, cfg, paper, ds, table1_notes))
        table1_notes.append(run_note(label, run, cfg, paper))
        if method_of(cfg, paper) != "MambaAD":
            continue  # the paper's per-class tables hold MambaAD's values only
        entry = paper["datasets"][ds]
        source = entry["source"]
        title = f"{label} vs paper {entry['name']} ({source['mean']}; classes: {source['classes']})"
        notes = [title, run_note(label, run, cfg, paper), paper_note(paper)]
        split = re.search(r"meta_20_(\d)", str(cfg.get("data.meta_file", "")))
        paper_classes = {_class_key(c): v for c, v in entry["classes"].items()}
        per_class = class_metrics(run, compared_protocol(run, paper_protocol("MambaAD", paper)))
        if ds != "coco":
            per_class, same_classes = _same_classes(per_class, entry, notes)
        rows = []
        for cls, ours in per_class.items():
            if cls == "mean":
                theirs = _with_mad(entry["mean"], entry["mAD"])
                if ds != "coco" and not same_classes:
                    shared = [paper_classes[_class_key(c)] for c in per_class if c != "mean"]
                    theirs = _with_mad([sum(col) / len(col) for col in zip(*shared, strict=True)])
                if ds == "coco" and split:  # one COCO-AD split per run: the paper's row of that split
                    theirs = _with_mad(entry["classes"][split.group(1)])
                    notes.append(f"COCO-AD split {split.group(1)}: the paper's mean is over all 4")
            elif ds == "coco":
                theirs = _with_mad(entry["classes"].get(split.group(1)) if split else None)
            else:
                theirs = _with_mad(paper_classes.get(_class_key(cls)))
            rows.append(_compare(cls, ours, theirs))
        sections.append((notes, _compare_header("class"), rows))
    if len(table1) > 1 or any(row[1] != "MambaAD" for row in table1):  # one MambaAD run: its own section
        notes = [f"runs vs paper {paper['tables']['table1']['source']}", *table1_notes, paper_note(paper)]
        sections.append((notes, ["data set", "method", *_compare_header("run")], table1))
    if ablation:
        sources = "; ".join(paper["tables"][t]["source"] for t in sorted({r[0] for r in ablation}))
        notes = [f"ablation runs vs paper {sources} (means)", *ablation_notes, paper_note(paper)]
        sections.append((notes, ["table", *_compare_header("run")], ablation))
    return sections


def table5_section(runs: list[tuple[str, Path]], paper: dict[str, Any]) -> PaperSection:
    """Paper Table 5 beside each run's parameters and FLOPs (its config counted by tools/flops.py at
    its input size) and, for MVTec AD runs, its mAD."""
    rows = []
    configs = [_flat_config(run) for _, run in runs]
    for (label, run), cfg, cost in zip(runs, configs, costs_of(runs, configs), strict=True):
        method = method_of(cfg, paper)
        printed = paper["tables"]["table5"]["rows"].get(method, {})
        try:
            on_mvtec = paper_dataset(cfg, paper, run) == "mvtec"
        except ValueError:  # a config of no paper data set: no mAD to compare
            on_mvtec = False
        wanted = compared_protocol(run, paper_protocol(method, paper)) if on_mvtec else None
        mad = mean_metrics(run, wanted)["mAD"] if on_mvtec else math.nan
        row: list[Any] = [label, method]
        for ours, key in ((cost["Params(M)"], "params_m"), (cost["FLOPs(G)"], "gflops"), (mad, "mAD")):
            theirs = printed.get(key, math.nan)
            row += [ours, theirs, ours - theirs]
        rows.append(row)
    columns = ("Params(M)", "FLOPs(G)", "mAD")
    header = ["run", "method"] + [f"{m}{suffix}" for m in columns for suffix in ("", " paper", " diff")]
    notes = [
        f"runs vs paper {paper['tables']['table5']['source']}",
        "FLOPs: 1 per multiply-add at the run's data.image_size, batch 1, selective scans left out "
        "(tools/flops.py); mAD only for MVTec AD runs; " + paper["notes"][2],
    ]
    return notes, header, rows


def render_sections(sections: list[PaperSection], fmt: str, digits: int) -> str:
    """Each section's notes (markdown text, ``#`` / ``%`` comments in csv / latex) and table."""
    title, prefix = {"markdown": ("### ", "- "), "csv": ("# ", "# "), "latex": ("% ", "% ")}[fmt]
    parts = []
    for notes, header, rows in sections:
        lines = [title + notes[0], *(prefix + n for n in notes[1:])]
        parts.append("\n".join(lines) + "\n\n" + render(header, rows, fmt, digits))
    return "\n\n".join(parts)


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
    parser.add_argument(
        "--cost",
        action="store_true",
        help="add each model's params (M) and GFLOPs; with --paper, a Table 5 beside the paper's",
    )
    parser.add_argument(
        "--over",
        metavar="KEY",
        help="merge runs that differ only in config KEY (e.g. seed): mean ± half the range, and n",
    )
    parser.add_argument(
        "--paper",
        nargs="?",
        const="auto",
        default=None,
        metavar="DATASET",
        help="compare with the paper's numbers (configs/paper_results.json): per class and mean; "
        "DATASET (mvtec, visa, ...) when the run's config name does not tell it",
    )
    parser.add_argument(
        "--unfinished",
        action="store_true",
        help="also list interrupted, failed, running or unfinished runs (their state is shown); by "
        "default they are left out of the table and its means, and named below it",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the table; returns the process exit code."""
    args = parse_args(argv)
    if args.over and args.unfinished:
        print(
            "error: --over averages finished runs only; drop --unfinished (or list them without --over)",
            file=sys.stderr,
        )
        return 2
    try:
        runs, notes = readable_runs(find_runs(args.runs))
        runs, left_out = finished_runs(runs, args.unfinished)
        notes += left_out
        if not runs:
            raise ValueError("no finished run to tabulate" + (f" ({'; '.join(notes)})" if notes else ""))
        if args.paper is not None:
            paper = load_paper()
            sections = paper_sections(runs, paper, args.paper)
            if args.cost:
                sections.append(table5_section(runs, paper))
            text = render_sections(sections, args.format, args.digits)
        else:
            table = build_table(runs, cost=args.cost)
            if args.over:
                table = average_over(*table, args.over)
            text = render(*table, args.format, args.digits)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if notes:
        prefix = {"markdown": "- ", "csv": "# ", "latex": "% "}[args.format]
        text += "\n\n" + "\n".join(prefix + note for note in notes)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
