"""The project's prepared GPU check: everything that needs CUDA, in one command, inside one budget.

    python tools/gpu_check.py [--out DIR] [--budget 420] [--only scan launch ...]

Sections (``tools/gpu_sections.py``), in this order:

``env``      torch, CUDA, cuDNN, Triton, mamba-ssm (or why it does not import), GPU, driver;
             the backend ``auto`` resolves to.
``tests``    the tests marked ``cuda`` (``pytest -m cuda``).
``scan``     at the four decoder stage shapes: Triton (and mamba-ssm when it imports) against the
             exact ``chunked`` scan, outputs and all gradients; repeated backward passes must be
             bit-identical; the batch-split path; SS2D modules with the fused cross-scan.
``ddp``      ``torchrun`` (NCCL) through the trainer's own wrapping: SyncBatchNorm, then DDP
             without the model's unused parameters; two training steps under bf16.
``launch``   the Triton kernels' ``num_warps`` and block size timed per stage shape at batch 1
             and 16, each checked against the exact scan; the fastest correct setting per shape
             is printed as the ``LAUNCH_TABLE`` to paste into ``model/ops/selective_scan_triton.py``.
``metrics``  the torch metric path on a Real-IAD-sized class (2000 maps of 256x256).
``train``    one epoch of ``run.py`` at 256x256, batch 16, Triton scan, bf16 and fp16.
``bench``    ``tools/benchmark.py`` on CUDA: scan op, inference, training step, per backend.

Each section runs in its own process group with what is left of ``--budget`` (seconds, for the
whole run, every child process included): one that runs over is stopped (SIGTERM, then
SIGKILL) and reported as cut, and the next starts if time is left. Sections record each result
as they get it (``OUT/sections/<name>.json``), so a section that fails or is cut keeps what it
measured. ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` are rewritten after every section; the
summary table is printed at the end. ``OUT`` defaults to ``$OUT/gpu_check`` where ``$OUT`` is set
(the folder the lent GPU machine sends back), else ``gpu_report``. Exits 1 when a section failed
or was cut, 2 without a CUDA device (``--device cpu`` runs the sections that can run on CPU, with
the Triton kernels interpreted: a check of this script, not of a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ORDER = ("env", "tests", "scan", "ddp", "launch", "metrics", "train", "bench")
# the most seconds each section may take; the budget left cuts it shorter
SECTION_LIMITS = {
    "env": 60,
    "tests": 150,
    "scan": 120,
    "ddp": 120,
    "launch": 150,
    "metrics": 90,
    "train": 150,
    "bench": 150,
    "selftest": 15,
}
MIN_START_S = 10.0  # a section does not start with less than this left
RESERVE_S = 5.0  # kept back for stopping a section and writing the report
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL


def default_out() -> Path:
    """``$OUT/gpu_check`` where the device machine provides ``$OUT``; ``gpu_report`` otherwise."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check" if out else Path("gpu_report")


def run_section(name: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """Run one section in a child process group, stop it after ``limit`` seconds; what it recorded."""
    sections = args.out / "sections"
    sections.mkdir(parents=True, exist_ok=True)
    result_file = sections / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(args.out)]
    cmd += [
        "--device",
        args.device,
        "--image-size",
        str(args.image_size),
        "--width-divisor",
        str(args.width_divisor),
    ]
    cmd += ["--deadline", str(time.time() + limit), "--selftest-sleep", str(args.selftest_sleep)]
    cmd += ["--stages", *map(str, args.stages)] if args.stages else []
    env = dict(os.environ)
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    with open(sections / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        cut = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            cut = True
            _stop_group(proc)
    seconds = time.perf_counter() - start
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result["section_seconds"] = seconds
    if cut:
        result.update(
            ok=False, cut=f"stopped after {limit:.0f} s (the budget left); results above are partial"
        )
    elif proc.returncode != 0 and "error" not in result:
        tail = (sections / f"{name}.log").read_text()[-3000:]
        result.update(ok=False, error=f"exit status {proc.returncode}", tail=tail)
    return result


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the section's whole process group (torchrun, pytest, run.py...), then SIGKILL to
    whatever of it is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def section_main(args: argparse.Namespace) -> int:
    """In the child: run one section, recording into ``OUT/sections/<name>.json``."""
    from tools.gpu_sections import SECTIONS, Recorder

    rec = Recorder(args.out / "sections" / f"{args.section}.json")
    try:
        rec.set(**SECTIONS[args.section](args, rec))
    except Exception as err:
        rec.set(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        return 1
    return 0


def state(section: dict[str, Any]) -> str:
    """One word or phrase for the summary table."""
    if "skipped" in section:
        return "skipped: " + section["skipped"]
    if "cut" in section:
        return "CUT (partial)"
    return "ok" if section.get("ok") else "FAILED"


def markdown(report: dict[str, Any]) -> str:
    """The summary table, then the measurement tables of the sections that have rows."""
    env = report.get("env", {})
    lines = [
        f"# GPU check, {env.get('date', '?')}",
        "",
        f"{env.get('gpu', 'no GPU: ' + str(env.get('device')))} ({env.get('gpu_memory_gib', '?')} GiB, "
        f"driver {env.get('driver')}), torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton "
        f"{env.get('triton')}, mamba-ssm {env.get('mamba_ssm')}; auto backend: {env.get('auto_backend')}",
        "",
        "| section | result | seconds |",
        "|---|---|---|",
    ]
    for name, sec in report.items():
        if isinstance(sec, dict):
            lines.append(f"| {name} | {state(sec)} | {sec.get('section_seconds', 0):.0f} |")
    lines += _scan_lines(report.get("scan", {}).get("rows", []))
    lines += _launch_lines(report.get("launch", {}))
    lines += _bench_lines(report.get("bench", {}))
    metrics = report.get("metrics", {})
    if "seconds" in metrics:
        peak = f", peak {metrics['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in metrics else ""
        diff = metrics.get("subset_max_abs_diff_vs_numpy")
        lines += [
            "",
            f"torch metrics, {metrics['maps']}: {metrics['seconds']:.2f} s{peak}, subset vs numpy {diff}",
        ]
    return "\n".join(lines) + "\n"


def _scan_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "| stage | backend | batch | check |", "|---|---|---|---|"]
    for r in rows:
        if "rel_err" in r:
            check = f"max rel err {max(r['rel_err'].values()):.1e} ({'ok' if r['ok'] else 'FAILED'})"
        elif "bit_identical" in r:
            check = f"{r['repeats']} backward passes bit-identical: {r['bit_identical']}"
        else:
            check = f"split vs whole rel err {r['rel_err_vs_whole']:.1e}"
        lines.append(f"| {r['stage']} | {r['backend']} | {r['batch']} | {check} |")
    return lines


def _launch_lines(launch: dict[str, Any]) -> list[str]:
    rows = launch.get("rows", [])
    if not rows:
        return []
    lines = ["", "| stage (L) | batch | block | warps | forward ms | backward ms | max rel err |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['stage']} ({r['L']}) | {r['batch']} | {r['block']} | {r['num_warps']} | "
            f"{r['forward_ms']:.3f} | {r['backward_ms']:.3f} | {r['max_rel_err']:.1e}"
            f"{'' if r['ok'] else ' FAILED'} |"
        )
    table = launch.get("suggested_table")
    if table:
        lines += ["", "LAUNCH_TABLE = {"]
        lines += [f"    {key}: ({value[0]}, {value[1]})," for key, value in table.items()]
        lines.append("}")
    return lines


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    lines = []
    if bench.get("scan"):
        lines += ["", "| scan stage | backend | forward ms | fwd+bwd ms |", "|---|---|---|---|"]
        for r in bench["scan"]:
            ms = [
                "-" if r.get(k) is None else f"{r[k] * 1e3:.2f}" for k in ("forward_s", "forward_backward_s")
            ]
            lines.append(f"| {r['stage']} (L={r['L']}) | {r['backend']} | {ms[0]} | {ms[1]} |")
    if bench.get("inference"):
        lines += ["", "| inference | backend | batch | images/s |", "|---|---|---|---|"]
        for r in bench["inference"]:
            lines.append(
                f"| model | {r['backend']} | {r.get('batch', '-')} | "
                f"{r.get('images_per_s', r.get('skipped') or r.get('failed'))} |"
            )
    if bench.get("train"):
        lines += ["", "| training step, batch 16 | backend | images/s | peak MiB |", "|---|---|---|---|"]
        for r in bench["train"]:
            if "fp32" not in r:
                lines.append(f"| - | {r['backend']} | {r.get('skipped') or r.get('failed')} | - |")
                continue
            for mode in ("fp32", "bf16_autocast"):
                m = r[mode]
                lines.append(
                    f"| {mode} | {r['resolved_backend']} | {m['images_per_s']} | {m['peak_memory_mib']:.0f} |"
                )
    return lines


def run_all(args: argparse.Namespace) -> int:
    """The sections in order, each inside what is left of the budget; the report after each."""
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    report: dict[str, Any] = {"budget_s": args.budget}
    for name in args.only or ORDER:
        left = deadline - time.perf_counter() - RESERVE_S
        if left < MIN_START_S:
            report[name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
        else:
            print(f"gpu_check: {name} (at most {min(left, SECTION_LIMITS[name]):.0f} s) ...", flush=True)
            report[name] = run_section(name, args, min(left, SECTION_LIMITS[name]))
            print(
                f"gpu_check: {name} {state(report[name])} in {report[name]['section_seconds']:.0f} s",
                flush=True,
            )
        report["total_seconds"] = args.budget - (deadline - time.perf_counter())
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: report in {args.out.resolve()}")
    bad = [
        n for n, sec in report.items() if isinstance(sec, dict) and state(sec) in ("FAILED", "CUT (partial)")
    ]
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: $OUT/gpu_check or gpu_report)"
    )
    parser.add_argument(
        "--stages", type=int, nargs="+", choices=range(4), help="scan and launch: these stages"
    )
    parser.add_argument("--only", nargs="+", choices=[*ORDER, "selftest"], help="run these sections only")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: interpreted Triton")
    parser.add_argument(
        "--width-divisor", type=int, default=1, help="scan and launch: stage widths / N (quick CPU runs)"
    )
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--selftest-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or default_out()
    if args.ddp_child:
        from tools.gpu_sections import ddp_child

        result = ddp_child(args.device, args.image_size)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return 0
    if args.section:
        return section_main(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; this check is for a machine with an NVIDIA GPU", file=sys.stderr
        )
        return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
