"""The project's prepared GPU check: everything that needs CUDA, in one command, with a report.

    python tools/gpu_check.py --out gpu_report [--budget 480] [--only scan metrics ...]

Sections, each timed and recorded even when it fails (the JSON is rewritten after every
section, so a crash or a timeout keeps what was measured):

``env``      torch, CUDA, cuDNN, Triton, mamba-ssm (or why it does not import), GPU, driver;
             the backend ``auto`` resolves to.
``tests``    the tests marked ``cuda`` (``pytest -m cuda``; skipped without a GPU).
``scan``     at the four decoder stage shapes (256x256 input): Triton (and mamba-ssm when it
             imports) against the exact ``chunked`` scan at batch 4, outputs and all
             gradients; ten backward passes at batch 16 must give bit-identical gradients;
             the large-tensor split path forced; SS2D modules (the fused cross-scan when the
             Triton backend has one) against ``chunked``.
``ddp``      a one-rank NCCL group (``torchrun``): SyncBatchNorm + DDP + bf16, two steps.
``metrics``  the torch metric path on a Real-IAD-sized class (2000 maps of 256x256): time,
             peak GPU memory, and the numpy path's values on a subset.
``train``    one epoch of ``run.py`` at 256x256, batch 16, scan backend ``triton``, with
             ``trainer.amp=bf16`` and ``fp16``, on generated data.
``bench``    ``tools/benchmark.py`` on CUDA: scan op per backend, inference at batch 1 and 16,
             training step at batch 16 (fp32, bf16) per backend, peak memory.

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``; exits 1 when a check failed. The whole
run is meant to stay under 8 minutes on one GPU; ``--budget`` skips sections that would start
after that many seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("env", "tests", "scan", "ddp", "metrics", "train", "bench")
BIT_IDENTICAL_REPEATS = 10


def _versions() -> dict[str, Any]:
    from model.ops import selective_scan as ss

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"missing ({err})"
    kernel = ss._mamba_ssm_kernel()
    info["mamba_ssm"] = (
        "imports" if kernel is not None else f"absent ({'; '.join(ss._MAMBA_SSM_IMPORT_ERROR)})"
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
        info["capability"] = f"{props.major}.{props.minor}"
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["driver"] = smi.stdout.strip() or None
        info["auto_backend"] = ss.resolve_backend("auto", torch.device("cuda"))
    return info


def check_tests(_: argparse.Namespace) -> dict[str, Any]:
    """Run the tests marked ``cuda`` (skipped everywhere else); pass/fail from pytest's exit status."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=300)
    lines = proc.stdout.strip().splitlines()
    return {"ok": proc.returncode == 0, "summary": lines[-1] if lines else "", "tail": proc.stdout[-3000:]}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) or 1.0
    return float((a.float() - b.float()).abs().max()) / scale


def _scan_run(backend: str, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    from model.ops.selective_scan import selective_scan_fn

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = selective_scan_fn(*leaves, delta_softplus=True, backend=backend)
    grads = torch.autograd.grad((y * weight).sum(), leaves)
    return [y.detach(), *grads]


def _stage_inputs(shape: dict[str, int], batch: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(shape["stage"])
    channels, length, n, k = shape["K"] * shape["d_inner"], shape["L"], shape["N"], shape["K"]
    tensors = [
        torch.randn(batch, channels, length, generator=g),
        torch.randn(batch, channels, length, generator=g) * 0.5 - 1.0,
        -torch.rand(channels, n, generator=g) * 4 - 0.1,
        torch.randn(batch, k, n, length, generator=g),
        torch.randn(batch, k, n, length, generator=g),
        torch.randn(channels, generator=g),
        torch.randn(channels, generator=g) * 0.3,
    ]
    return [t.to(device) for t in tensors]


def check_scan(args: argparse.Namespace) -> dict[str, Any]:
    """Triton (and mamba-ssm) against ``chunked`` per stage; bit-identical repeated backward; split path."""
    from model.ops import selective_scan_triton as sst
    from model.ops.selective_scan import available_backends
    from tools.benchmark import stage_shapes

    device = torch.device("cuda")
    names = ("y", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
    backends = [b for b in ("triton", "mamba_ssm") if b in available_backends()]
    rows, ok = [], True
    for shape in stage_shapes(args.image_size):
        inputs = _stage_inputs(shape, 4, device)
        weight = torch.randn(inputs[0].shape, device=device, generator=torch.Generator(device).manual_seed(1))
        want = _scan_run("chunked", inputs, weight)
        for backend in backends:
            got = _scan_run(backend, inputs, weight)
            errs = {n: _rel_err(a, b) for n, a, b in zip(names, got, want)}
            passed = errs["y"] < 1e-4 and max(errs.values()) < 2e-3
            ok &= passed
            rows.append(
                {"stage": shape["stage"], "backend": backend, "batch": 4, "ok": passed, "rel_err": errs}
            )
        del want
        big = _stage_inputs(shape, 16, device)
        weight = torch.randn(big[0].shape, device=device)
        first = _scan_run("triton", big, weight)
        identical = all(
            all(torch.equal(a, b) for a, b in zip(first, _scan_run("triton", big, weight)))
            for _ in range(BIT_IDENTICAL_REPEATS - 1)
        )
        ok &= identical
        rows.append({"stage": shape["stage"], "backend": "triton", "batch": 16, "bit_identical": identical})
        limit = sst._MAX_ELEMENTS
        per_sample = sst._elements_per_sample(
            big[0].shape[1], shape["K"], shape["d_inner"], shape["L"], shape["N"]
        )
        sst._MAX_ELEMENTS = 3 * per_sample + 1  # pieces of 3 samples
        try:
            split = _scan_run("triton", big, weight)
        finally:
            sst._MAX_ELEMENTS = limit
        split_err = max(_rel_err(a, b) for a, b in zip(split, first))
        ok &= split_err < 1e-5
        rows.append(
            {"stage": shape["stage"], "backend": "triton (split)", "batch": 16, "rel_err_vs_whole": split_err}
        )
        del big, first, split
        torch.cuda.empty_cache()
    rows += _ss2d_rows(args.image_size, device)
    ok &= all(r.get("ok", True) for r in rows)
    return {"ok": ok, "rows": rows}


def _ss2d_rows(image_size: int, device: torch.device) -> list[dict[str, Any]]:
    """One SS2D module per stage (dims as in the decoder), Triton against ``chunked`` at batch 4."""
    from model.mambaad.scan_orders import ScanOptions
    from model.mambaad.ss2d import SS2D
    from model.ops.selective_scan import forced_backend
    from tools.benchmark import STAGE_DIMS

    rows = []
    for stage, dim in enumerate(STAGE_DIMS):
        side = image_size // 32 * 2**stage
        torch.manual_seed(stage)
        module = SS2D(d_model=dim, size=side, scan=ScanOptions(method="hilbert", directions=8)).to(device)
        x = torch.randn(4, side, side, dim, device=device)
        results = []
        for backend in ("chunked", "triton"):
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with forced_backend(backend):
                y = module(xi)
            y.square().mean().backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            results.append((y.detach(), xi.grad, grads))
        (y0, gx0, g0), (y1, gx1, g1) = results
        errs = {"y": _rel_err(y1, y0), "dx": _rel_err(gx1, gx0)}
        errs.update({f"d{n}": _rel_err(g1[n], g0[n]) for n in g0})
        passed = errs["y"] < 1e-4 and max(errs.values()) < 2e-3
        rows.append(
            {"stage": stage, "backend": "SS2D triton vs chunked", "batch": 4, "ok": passed, "rel_err": errs}
        )
    return rows


def ddp_child() -> dict[str, Any]:
    """One rank under ``torchrun``: NCCL group, SyncBatchNorm, DDP, two bf16 training steps."""
    import torch.distributed as dist

    from model.mambaad.network import MambaAD
    from util.distributed import init_distributed, shutdown

    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    init_distributed("cuda", timeout_s=600)
    if not dist.is_initialized():  # a world of one: init_distributed leaves it alone
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=600))
    model = MambaAD(teacher="resnet34", image_size=256, log=lambda *a: None).to(device).train()
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for _ in range(2):
        x = torch.randn(8, 3, 256, 256, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            feats_t, feats_s = net(x)
            loss = sum(torch.nn.functional.mse_loss(s.float(), t.float()) for t, s in zip(feats_t, feats_s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss))
    sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    shutdown()
    return {"losses": losses, "grads_finite": finite, "sync_bn_layers": sync_bn}


def check_ddp(_: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += [str(Path(__file__).resolve()), "--ddp-child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=300)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = result["grads_finite"] and result["sync_bn_layers"] > 0 and all(map(_finite, result["losses"]))
    return {"ok": ok, **result}


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def check_metrics(_: argparse.Namespace) -> dict[str, Any]:
    """Torch metrics on a Real-IAD-sized class on the GPU; numpy values on a 200-map subset."""
    import numpy as np

    from evaluation.metrics import compute_metrics
    from evaluation.metrics_torch import compute_metrics_torch

    rng = np.random.default_rng(0)
    n, size = 2000, 256
    masks = np.zeros((n, size, size), bool)
    labels = rng.integers(0, 2, n)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 40, 2)
        masks[i, y : y + rng.integers(4, 40), x : x + rng.integers(4, 40)] = True
    maps = (rng.random((n, size, size), dtype=np.float32) + masks * 0.5).astype(np.float16)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    gpu = compute_metrics_torch(torch.from_numpy(maps).to(device), masks, labels, device=device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    sub = slice(0, 200)
    want = compute_metrics(maps[sub], masks[sub], labels[sub])
    got = compute_metrics_torch(
        torch.from_numpy(maps[sub]).to(device), masks[sub], labels[sub], device=device
    )
    err = max(abs(got[k] - want[k]) for k in want)
    return {
        "ok": err < 1e-9,
        "maps": f"{n} x {size}x{size} float16",
        "seconds": seconds,
        "peak_gpu_gib": peak,
        "values": gpu,
        "subset_max_abs_diff_vs_numpy": err,
    }


def check_train(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of run.py at 256x256, batch 16, Triton scan, bf16 and fp16 autocast."""
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for amp in ("bf16", "fp16"):
            cmd = [sys.executable, "run.py", "-c", "configs/mambaad_demo.py", f"data.root={tmp}/data"]
            cmd += [
                f"output_dir={tmp}/runs",
                f"data.image_size={args.image_size}",
                f"data.synthetic_args.image_size={args.image_size}",
                "data.batch_size=16",
                "data.num_workers=4",
                "trainer.epochs=1",
                "trainer.test_every=1",
                "model.scan.backend=triton",
                f"trainer.amp={amp}",
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=400)
            logs = sorted(Path(tmp, "runs").glob("*/log.txt"), key=os.path.getmtime)
            log = logs[-1].read_text() if logs else proc.stdout + proc.stderr
            row = {"amp": amp, "ok": proc.returncode == 0, "seconds": time.perf_counter() - start}
            row["memory_lines"] = [ln.strip() for ln in log.splitlines() if "peak GPU memory" in ln]
            if proc.returncode != 0:
                row["error"] = (proc.stdout + proc.stderr)[-3000:]
            rows.append(row)
            ok &= row["ok"]
    return {"ok": ok, "rows": rows}


def check_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Speed on CUDA: scan op per backend, inference at batch 1 and 16, training step at batch 16."""
    from model.ops.selective_scan import available_backends
    from tools.benchmark import bench_inference, bench_scan, bench_train_cuda, stage_shapes

    device = torch.device("cuda")
    backends = [b for b in ("triton", "mamba_ssm", "chunked") if b in available_backends()]
    out: dict[str, Any] = {"ok": True, "backends": backends, "scan": [], "inference": [], "train": []}
    for shape in stage_shapes(args.image_size):
        for backend in backends:
            out["scan"].append({"backend": backend, **shape, **bench_scan(backend, shape, 5, device)})
    for backend in backends:
        for batch in (1, 16):
            result = bench_inference(backend, args.image_size, 5, device, batch=batch)
            out["inference"].append({"backend": backend, **result})
            torch.cuda.empty_cache()
    for backend in backends:
        try:
            out["train"].append(bench_train_cuda(args.image_size, 16, 3, backend=backend))
        except torch.OutOfMemoryError:  # chunked keeps every state for backward
            out["train"].append({"backend": backend, "skipped": "out of GPU memory"})
        torch.cuda.empty_cache()
    return out


CHECKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": lambda args: {"ok": True, **_versions()},
    "tests": check_tests,
    "scan": check_scan,
    "ddp": check_ddp,
    "metrics": check_metrics,
    "train": check_train,
    "bench": check_bench,
}


def markdown(report: dict[str, Any]) -> str:
    """A readable summary: one line per section, then the measurement tables."""
    env = report.get("env", {})
    lines = [
        f"# GPU check, {env.get('date', '?')}",
        "",
        f"{env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '?')} GiB, driver {env.get('driver')}), "
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton {env.get('triton')}, "
        f"mamba-ssm {env.get('mamba_ssm')}; auto backend: {env.get('auto_backend')}",
        "",
        "| section | result | seconds |",
        "|---|---|---|",
    ]
    for name in SECTIONS:
        sec = report.get(name)
        if sec is None:
            continue
        state = "skipped: " + sec["skipped"] if "skipped" in sec else ("ok" if sec.get("ok") else "FAILED")
        lines.append(f"| {name} | {state} | {sec.get('section_seconds', 0):.0f} |")
    scan = report.get("scan", {}).get("rows", [])
    if scan:
        lines += ["", "| stage | backend | batch | check |", "|---|---|---|---|"]
        for r in scan:
            if "rel_err" in r:
                check = f"max rel err {max(r['rel_err'].values()):.1e} ({'ok' if r['ok'] else 'FAILED'})"
            elif "bit_identical" in r:
                check = f"{BIT_IDENTICAL_REPEATS} backward passes bit-identical: {r['bit_identical']}"
            else:
                check = f"split vs whole rel err {r['rel_err_vs_whole']:.1e}"
            lines.append(f"| {r['stage']} | {r['backend']} | {r['batch']} | {check} |")
    bench = report.get("bench", {})
    if bench.get("scan"):
        lines += ["", "| scan stage | backend | forward ms | fwd+bwd ms |", "|---|---|---|---|"]
        for r in bench["scan"]:
            fwd, both = (r.get(k) for k in ("forward_s", "forward_backward_s"))
            ms = ["-" if v is None else f"{v * 1e3:.2f}" for v in (fwd, both)]
            lines.append(f"| {r['stage']} (L={r['L']}) | {r['backend']} | {ms[0]} | {ms[1]} |")
    if bench.get("inference"):
        lines += ["", "| inference | backend | batch | images/s |", "|---|---|---|---|"]
        for r in bench["inference"]:
            lines.append(f"| model | {r['backend']} | {r.get('batch', '-')} | {r.get('images_per_s', '-')} |")
    if bench.get("train"):
        lines += ["", "| training step, batch 16 | backend | images/s | peak MiB |", "|---|---|---|---|"]
        for r in bench["train"]:
            if "skipped" in r:
                lines.append(f"| - | {r['backend']} | skipped: {r['skipped']} | - |")
                continue
            for mode in ("fp32", "bf16_autocast"):
                m = r[mode]
                lines.append(
                    f"| {mode} | {r['resolved_backend']} | {m['images_per_s']} | {m['peak_memory_mib']:.0f} |"
                )
    metrics = report.get("metrics", {})
    if "seconds" in metrics:
        lines += [
            "",
            f"GPU metrics, {metrics['maps']}: {metrics['seconds']:.2f} s, "
            f"peak {metrics['peak_gpu_gib']:.2f} GiB, "
            f"subset vs numpy max |diff| {metrics['subset_max_abs_diff_vs_numpy']:.1e}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_report", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no section starts")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_child:
        result = ddp_child()
        print(json.dumps(result))
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; this check is for a machine with an NVIDIA GPU", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    start = time.perf_counter()
    for name in args.only or SECTIONS:
        if name != "env" and time.perf_counter() - start > args.budget:
            report[name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            report[name] = CHECKS[name](args)
        except Exception as err:
            report[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
        report[name]["section_seconds"] = time.perf_counter() - t0
        print(f"gpu_check: {name} {'ok' if report[name].get('ok') else 'FAILED'}", flush=True)
        torch.cuda.empty_cache()
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [n for n, sec in report.items() if not sec.get("ok", True) and "skipped" not in sec]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
