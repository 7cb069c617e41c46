"""Old vs new ``cpu`` selective-scan kernels, side by side in one run.

    python tools/bench_cpu_backward.py [--old-ref REV] [--repeats 5] [--rounds 2] [--no-train]

The old kernel is ``model/ops/selective_scan_cpu.py`` of ``<old-ref>`` with the ``model/`` and
``util/`` it imports, unpacked as a package of another name; the new one is the working tree's.
Measures, as medians of ``--repeats`` runs after a warm-up run: (a) the scan forward and
forward+backward at the four decoder stage shapes of ``tools/benchmark.py`` (batch 1, softplus
on), both kernels in one process, their runs alternating so that load from other jobs hits both
alike; (b) one training step of the whole model (forward, backward, AdamW) at batch 4 with the
``cpu`` backend, wall and CPU time: the whole old tree (``git archive`` of <old-ref>, so
changes outside the kernel file count too) and the working tree, each in a process of its own
(its peak RSS is its own), ``--rounds`` times alternately; the median over rounds of each
round's median step (CPU time varies less than wall time when other jobs share the cores).
Prints a markdown table with the new/old ratios (below 1: the new code is faster), and per
stage each kernel's forward+backward time over its forward time.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.ops import selective_scan_cpu  # noqa: E402
from model.ops.selective_scan import prepare_cpu, selective_scan_fn  # noqa: E402
from tools.benchmark import _scan_inputs, stage_shapes  # noqa: E402

OLD_PACKAGE = "mambaad_old"  # the old revision's model/ and util/, imported under this name


def old_kernel(ref: str):
    """The ``selective_scan_cpu`` function of git revision ``ref`` (compiled once, then cached).

    The revision's ``model/`` and ``util/`` are unpacked into a package of their own, their
    absolute imports rewritten to it, so that a kernel spread over several files (the split
    ``model/ops/cpu_*.py``) runs entirely as it was in ``ref``, and an older single file too.
    """
    root = Path(tempfile.gettempdir()) / "mambaad_old_scan_kernel" / ref.replace("/", "_")
    package = root / OLD_PACKAGE
    if not package.is_dir():
        archive = subprocess.run(
            ["git", "archive", ref, "model", "util"], capture_output=True, check=True, cwd=ROOT
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(package, filter="data")
        (package / "__init__.py").write_text("")
        for path in package.rglob("*.py"):
            text = path.read_text()
            for top in ("model", "util"):
                text = text.replace(f"from {top}.", f"from {OLD_PACKAGE}.{top}.")
                text = text.replace(f"from {top} import", f"from {OLD_PACKAGE}.{top} import")
            path.write_text(text)
    sys.path.insert(0, str(root))
    module = importlib.import_module(f"{OLD_PACKAGE}.model.ops.selective_scan_cpu")
    sys.path.remove(str(root))
    return module.selective_scan_cpu


def use(kernels: dict, name: str) -> None:
    """Make backend ``cpu`` call kernel ``name`` (the dispatcher imports the function per call)."""
    selective_scan_cpu.selective_scan_cpu = kernels[name]


def scan_rows(kernels: dict, image_size: int, repeats: int) -> dict:
    """{row: {kernel: median ms}} for the scan at the stage shapes, old and new runs alternating."""
    rows = {}
    for shape in stage_shapes(image_size):
        inputs = _scan_inputs(shape, torch.device("cpu"))

        def forward(inputs=inputs):
            with torch.no_grad():
                selective_scan_fn(*inputs, delta_softplus=True, backend="cpu")

        def forward_backward(inputs=inputs):
            selective_scan_fn(*inputs, delta_softplus=True, backend="cpu").sum().backward()

        key = f"stage {shape['stage']}: L={shape['L']}, K*d={shape['K'] * shape['d_inner']}"
        times = {(fn, name): [] for fn in (forward, forward_backward) for name in kernels}
        for run in range(repeats + 1):
            for fn, name in times:
                use(kernels, name)
                start = time.perf_counter()
                fn()
                if run:  # the first run is the warm-up
                    times[fn, name].append((time.perf_counter() - start) * 1e3)
        for (fn, name), values in times.items():
            what = "scan forward (ms)" if fn is forward else "scan fwd+bwd (ms)"
            rows.setdefault(f"{what}, {key}", {})[name] = statistics.median(values)
    return rows


def old_tree(ref: str) -> Path:
    """The files of git revision ``ref`` in a temporary folder (extracted once per revision)."""
    commit = subprocess.run(
        ["git", "rev-parse", ref], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    folder = Path(tempfile.gettempdir()) / "mambaad_old_trees" / commit
    if not (folder / "tools" / "benchmark.py").is_file():
        archive = subprocess.run(["git", "archive", commit], capture_output=True, check=True, cwd=ROOT).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
    return folder


# run with the tree being measured as the working directory: its own model and kernels
TRAIN_CHILD = """
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, ".")
from model.ops.selective_scan import prepare_cpu
from tools.benchmark import _train_step_fn, build_model
prepare_cpu()
size, repeats = int(sys.argv[1]), int(sys.argv[2])
model = build_model(size, "cpu", torch.device("cpu")).train()
step = _train_step_fn(model, torch.randn(4, 3, size, size), False)
step()  # warm-up: compiles or loads the kernels
wall, cpu = [], []
for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps([statistics.median(wall), statistics.median(cpu), peak]))
"""


def train_rows(tree: Path, image_size: int, repeats: int) -> dict:
    """One training-step measurement of the code at ``tree``, in a process of its own."""
    cmd = [sys.executable, "-c", TRAIN_CHILD, str(image_size), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"training step in {tree} failed:\n{proc.stderr[-2000:]}")
    wall, cpu, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "train step, batch 4 (s)": wall,
        "train step, CPU time of all threads (s)": cpu,
        "train peak RSS (MiB)": peak,
    }


def child(args: argparse.Namespace) -> dict:
    """Run in a fresh process: the scan rows of both kernels."""
    kernels = {"old": old_kernel(args.old_ref), "new": selective_scan_cpu.selective_scan_cpu}
    prepare_cpu()
    small = _scan_inputs({"L": 20, "d_inner": 4, "K": 2, "N": 16}, torch.device("cpu"))
    for name in kernels:  # compile (or load) both before timing anything
        use(kernels, name)
        selective_scan_fn(*small, delta_softplus=True, backend="cpu").sum().backward()
    return scan_rows(kernels, args.image_size, args.repeats)


def run_child(what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what, "--old-ref", args.old_ref]
    cmd += ["--image-size", str(args.image_size), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-ref", default="HEAD", help="git revision of the old kernel (default HEAD)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating old/new training processes")
    parser.add_argument("--no-train", action="store_true", help="scan rows only")
    parser.add_argument("--child", choices=("scan",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = run_child("scan", args)
    for key in [k for k in rows if k.startswith("scan forward (ms), ")]:
        stage = key.removeprefix("scan forward (ms), ")
        both = rows[f"scan fwd+bwd (ms), {stage}"]
        rows[f"fwd+bwd / forward, {stage}"] = {name: both[name] / rows[key][name] for name in rows[key]}
    trees = {"old": old_tree(args.old_ref), "new": ROOT}
    measured: dict[str, dict[str, list[float]]] = {}
    for _ in range(0 if args.no_train else args.rounds):
        for name, tree in trees.items():
            for key, value in train_rows(tree, args.image_size, args.repeats).items():
                measured.setdefault(key, {}).setdefault(name, []).append(value)
    for key, values in measured.items():
        rows[key] = {name: statistics.median(v) for name, v in values.items()}
    print(f"| measurement ({args.image_size}x{args.image_size}) | old | new | new / old |")
    print("|---|---:|---:|---:|")
    for key, value in rows.items():
        print(f"| {key} | {value['old']:.4g} | {value['new']:.4g} | {value['new'] / value['old']:.2f} |")


if __name__ == "__main__":
    main()
