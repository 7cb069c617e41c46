"""Time and peak memory of the evaluation metrics on synthetic data, next to scikit-learn.

python tools/benchmark_metrics.py                      # MVTec-sized: 15 classes, 1,725 maps of 256x256
python tools/benchmark_metrics.py --groups exact ader  # some groups: evaluator exact ader sklearn torch
python tools/benchmark_metrics.py --realiad            # Real-IAD-sized run: 30 classes, 114,585 maps

Every measurement runs in its own subprocess, so its peak RSS (``VmHWM``) is its own. The
synthetic maps are generated once into a temporary folder (float32 maps, bool masks) and read
class by class through memory maps: per-metric rows time only the metric calls, summed over
classes, and their peak RSS includes the class's input maps. ``evaluator`` rows stream batches of
32 maps into ``evaluation.evaluator.ADEvaluator`` (float16 storage) and time ``compute()``; their peak
RSS is the whole evaluation. The ``torch`` group times all seven metrics with
``evaluation.metrics_torch`` on ``--torch-device`` (default cpu; the time includes moving the maps
there). Results go to a JSON file (merged with an existing one, so groups can be run separately)
and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
GROUPS = ("evaluator", "exact", "ader", "sklearn", "torch")
REALIAD_IMAGES = 114_585


def class_sizes(n_images: int, n_classes: int) -> list[int]:
    """Split ``n_images`` as evenly as possible over ``n_classes``."""
    base, extra = divmod(n_images, n_classes)
    return [base + (i < extra) for i in range(n_classes)]


def synthetic_class(seed: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth noise maps [n, size, size] float32, masks with blob defects in ~70 % of the images, labels.

    Defects cover roughly 0.5-5 % of an anomalous image and raise its map by a random strength, so
    the metrics are neither trivial nor at chance (like a mid-quality detector).
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.7).astype(np.int64)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in np.flatnonzero(labels):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.03, 0.12, 2) * size
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    noise = rng.standard_normal((n, size, size)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 4, 4))
    maps *= 1.0 / maps.std()
    strength = rng.uniform(0.5, 3.0, n).astype(np.float32)[:, None, None]
    maps += strength * ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 2, 2))
    maps -= maps.min()
    return maps, masks, labels


def generate(folder: Path, n_images: int, n_classes: int, size: int, seed: int) -> dict[str, Any]:
    """Write maps.npy (float32), masks.npy (bool), labels.npy and the class offsets into ``folder``."""
    sizes = class_sizes(n_images, n_classes)
    maps = np.lib.format.open_memmap(
        folder / "maps.npy", mode="w+", dtype=np.float32, shape=(n_images, size, size)
    )
    masks = np.lib.format.open_memmap(
        folder / "masks.npy", mode="w+", dtype=bool, shape=(n_images, size, size)
    )
    labels = np.zeros(n_images, dtype=np.int64)
    start = 0
    for c, n in enumerate(sizes):
        m, g, y = synthetic_class(seed + c, n, size)
        maps[start : start + n], masks[start : start + n], labels[start : start + n] = m, g, y
        start += n
    maps.flush()
    masks.flush()
    np.save(folder / "labels.npy", labels)
    return {"offsets": np.cumsum([0, *sizes]).tolist(), "pixels": n_images * size * size}


def _sklearn_metric(name: str, maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    if name.startswith("I-"):
        y, s = labels, maps.reshape(len(maps), -1).max(axis=1)
    else:
        y, s = masks.reshape(-1), maps.reshape(-1)
    if name.endswith("AUROC"):
        return float(roc_auc_score(y, s))
    if name.endswith("-AP"):
        return float(average_precision_score(y, s))
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    return float(np.max(np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)))


def _load_class(folder: Path, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of maps/masks/labels ``a:b``; the memory maps are dropped so RSS holds one class only."""
    maps = np.load(folder / "maps.npy", mmap_mode="r")
    masks = np.load(folder / "masks.npy", mmap_mode="r")
    out = np.array(maps[a:b]), np.array(masks[a:b]), np.load(folder / "labels.npy")[a:b]
    del maps, masks
    return out


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident set size in MB (Linux; ``VmHWM`` = this process's peak), ``ru_maxrss`` elsewhere.

    ``ru_maxrss`` is not used on Linux: it survives fork + exec, so a worker would inherit the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as handle:
            line = next(x for x in handle if x.startswith(field + ":"))
        return float(line.split()[1]) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_metric(task: dict[str, Any]) -> dict[str, Any]:
    """Time one metric (or "all") of one implementation over every class."""
    folder = Path(task["folder"])
    offsets = task["offsets"]
    metric, impl = task["metric"], task["impl"]
    wanted = list(METRICS) if metric == "all" else [metric]
    if impl == "ader":
        from evaluation.metrics_ader import compute_metrics_ader as fn
    elif impl == "exact":
        from evaluation.metrics import compute_metrics as fn
    elif impl.startswith("torch-"):
        from evaluation.metrics_torch import compute_metrics_torch

        def fn(
            maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, metrics: list[str]
        ) -> dict[str, float]:
            return compute_metrics_torch(maps, masks, labels, metrics=metrics, device=impl[len("torch-") :])
    else:
        import sklearn.metrics  # noqa: F401 - imported before the clock starts
    seconds, values = 0.0, {m: [] for m in wanted}
    for a, b in itertools.pairwise(offsets):
        maps, masks, labels = _load_class(folder, a, b)
        t0 = time.perf_counter()
        if impl == "sklearn":
            out = {metric: _sklearn_metric(metric, maps, masks, labels)}
        else:
            out = fn(maps, masks, labels, metrics=wanted)
        seconds += time.perf_counter() - t0
        for m in wanted:
            values[m].append(out[m])
        del maps, masks
    means = {m: float(np.nanmean(v)) for m, v in values.items()}
    if metric == "all":
        means["mAD"] = float(np.mean(list(means.values())))
    return {"seconds": seconds, "values": means}


def _worker_evaluator(task: dict[str, Any]) -> dict[str, Any]:
    """Stream every map into ADEvaluator in batches of 32, then compute (per-class metrics)."""
    import torch

    from evaluation.evaluator import ADEvaluator

    ev = ADEvaluator(
        mode=task["mode"],
        also_exact=False,  # time the mode alone
        spill_dir=task.get("spill_dir"),
        spill_mb=task.get("spill_mb", 512),
    )
    t0 = time.perf_counter()
    n_maps = 0
    for c, n in enumerate(task["class_sizes"]):
        if "folder" in task:
            a = task["offsets"][c]
            maps, masks, labels = _load_class(Path(task["folder"]), a, a + n)
        for s in range(0, n, 32):
            if "folder" not in task:  # generated on the fly, batch by batch (Real-IAD size)
                mb, gb, lb = synthetic_class(task["seed"] + 1000 * c + s, min(32, n - s), task["size"])
            else:
                mb, gb, lb = maps[s : s + 32], masks[s : s + 32], labels[s : s + 32]
            t = torch.from_numpy(mb)
            ids = [f"c{c}_s{(s + j) // 5}" for j in range(len(mb))] if task.get("sample_ids") else None
            ev.update(
                t, t.flatten(1).amax(1), torch.from_numpy(gb), torch.from_numpy(lb), [f"c{c}"] * len(mb), ids
            )
            n_maps += len(mb)
    t_update = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = ev.compute()
    t_compute = time.perf_counter() - t0
    return {
        "seconds": t_compute,
        "update_seconds": t_update,
        "maps": n_maps,
        "values": {k: float(v) for k, v in results["mean"].items()},
    }


def _run_worker(task: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(task)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {task.get('impl')} {task.get('metric')} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_main(task: dict[str, Any]) -> None:
    base = _rss_mb()  # after start-up: Python, numpy, scipy
    out = _worker_evaluator(task) if task["impl"] == "evaluator" else _worker_metric(task)
    out["start_rss_mb"] = base
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    print(json.dumps(out))


def _save(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _tasks(
    groups: list[str], info: dict[str, Any], folder: Path, sizes: list[int], torch_device: str = "cpu"
) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    common = {"folder": str(folder), "offsets": info["offsets"]}
    if "evaluator" in groups:
        for mode in ("exact", "ader"):
            tasks.append(
                {
                    **common,
                    "impl": "evaluator",
                    "metric": f"evaluator ({mode})",
                    "mode": mode,
                    "class_sizes": sizes,
                }
            )
    for impl in ("exact", "ader"):
        if impl in groups:
            names = [m for m in METRICS if impl == "exact" or m.startswith("P-") or m == "AUPRO"]
            tasks += [{**common, "impl": impl, "metric": m} for m in [*names, "all"]]
    if "sklearn" in groups:
        tasks += [{**common, "impl": "sklearn", "metric": m} for m in METRICS if m != "AUPRO"]
    if "torch" in groups:
        tasks.append({**common, "impl": f"torch-{torch_device}", "metric": "all"})
    return tasks


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| implementation | metric | seconds | peak RSS MB | start RSS MB | value (x100) |",
        "|:---|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        values = r["values"]
        value = values.get(r["metric"], values.get("mAD", float("nan")))
        cells = [
            r["impl"],
            r["metric"],
            f"{r['seconds']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r.get('start_rss_mb', float('nan')):.0f}",
            f"{100 * value:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1725, help="number of maps (MVTec AD test set: 1725)")
    p.add_argument("--classes", type=int, default=15)
    p.add_argument("--size", type=int, default=256, help="map side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--metrics", nargs="+", choices=[*METRICS, "all"], help="only these metric rows")
    p.add_argument("--torch-device", default="cpu", help="device of the torch group (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--realiad", action="store_true", help="instead: the Real-IAD-sized streaming evaluator run"
    )
    p.add_argument("--mode", choices=("exact", "ader"), default="exact", help="evaluator mode for --realiad")
    p.add_argument(
        "--spill-dir", default=None, help="where --realiad spills maps (default: a temporary folder)"
    )
    p.add_argument(
        "--out", default="runs/benchmark_metrics.json", help="JSON file (results are merged into it)"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    if args.worker:
        _worker_main(json.loads(args.worker))
        return 0
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.realiad:
        n_images = args.images if args.images != 1725 else REALIAD_IMAGES
        n_classes = args.classes if args.classes != 15 else 30
        sizes = class_sizes(n_images, n_classes)
        task = {
            "impl": "evaluator",
            "metric": f"evaluator ({args.mode})",
            "mode": args.mode,
            "class_sizes": sizes,
        }
        task.update(size=args.size, seed=args.seed, sample_ids=True, spill_dir=args.spill_dir)
        row = {**_run_worker(task), "impl": "evaluator", "metric": task["metric"]}
        key = f"realiad_{n_images}x{args.size}_{n_classes}cls"
        report[key] = {"cpus": cpus, "rows": [row]}
        print(_table([row]))
    else:
        sizes = class_sizes(args.images, args.classes)
        key = f"synthetic_{args.images}x{args.size}_{args.classes}cls"
        entry = report.setdefault(key, {"cpus": cpus, "rows": []})
        with tempfile.TemporaryDirectory(prefix="mambaad_bench_") as tmp:
            t0 = time.perf_counter()
            info = generate(Path(tmp), args.images, args.classes, args.size, args.seed)
            mpix, secs = info["pixels"] / 1e6, time.perf_counter() - t0
            print(f"generated {args.images} maps ({mpix:.0f} M pixels) in {secs:.1f} s")
            tasks = _tasks(args.groups, info, Path(tmp), sizes, args.torch_device)
            if args.metrics:
                tasks = [t for t in tasks if t["impl"] == "evaluator" or t["metric"] in args.metrics]
            for task in tasks:
                row = {**_run_worker(task), "impl": task["impl"], "metric": task["metric"]}
                rows = entry["rows"]
                entry["rows"] = [r for r in rows if (r["impl"], r["metric"]) != (row["impl"], row["metric"])]
                entry["rows"].append(row)
                _save(out_path, report)  # after every row, so a long run keeps what it measured
                print(_table([row]).splitlines()[-1], flush=True)
        entry["cpus"] = cpus
        print(_table(entry["rows"]))
    _save(out_path, report)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
