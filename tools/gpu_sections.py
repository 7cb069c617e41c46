"""The sections of ``tools/gpu_check.py``: each runs in its own process and records as it goes.

A section is ``fn(args, rec) -> dict``. It appends rows and sets values on ``rec`` (a
:class:`Recorder`, which rewrites ``OUT/sections/<name>.json`` at every call), so whatever it
measured before a failure, a timeout or a kill is on disk; the dict it returns is added last.
``args.device`` is ``cuda``, or ``cpu`` with the Triton kernels under ``TRITON_INTERPRET=1``
(for the tests: correctness only, timings there say nothing about a GPU). ``args.deadline`` is
the wall-clock time (``time.time()``) by which the runner will stop the section; sections give
their own child processes what is left of it.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
BIT_IDENTICAL_REPEATS = 10
WARPS = (1, 2, 4, 8)
BLOCKS = (4, 8, 16, 32)
LAUNCH_BATCHES = (1, 16)


class Recorder:
    """A section's results so far, written to ``path`` (atomically) after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def set(self, **values: Any) -> None:
        """Set top-level values and write."""
        self.data.update(values)
        self.write()

    def append(self, key: str, row: dict[str, Any]) -> None:
        """Append a row to the list ``key`` and write."""
        self.data.setdefault(key, []).append(row)
        self.write()

    def write(self) -> None:
        """Replace the file in one step, so a reader never sees half of it."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def remaining(args: Namespace, reserve: float = 2.0) -> float:
    """Seconds left before the runner stops this section (at least 1, for a subprocess timeout)."""
    return max(1.0, args.deadline - time.time() - reserve)


def stage_shapes(args: Namespace) -> list[dict[str, int]]:
    """The scan shapes of the decoder's four stages at ``args.image_size``, with ``d_inner`` divided
    by ``args.width_divisor`` (1 on a GPU; larger for a quick interpreted run on CPU); only
    ``args.stages`` where given."""
    from tools.benchmark import stage_shapes as paper_shapes

    shapes = paper_shapes(args.image_size)
    shapes = [{**s, "d_inner": max(2, s["d_inner"] // args.width_divisor)} for s in shapes]
    return [s for s in shapes if args.stages is None or s["stage"] in args.stages]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_env(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """Versions (torch, CUDA, cuDNN, Triton, mamba-ssm), the GPU and driver, the ``auto`` backend."""
    from model.ops import selective_scan as ss

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device": args.device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"missing ({err})"
    modules = ("timm", "numpy", "scipy", "PIL", "tqdm", "numba", "tensorboard", "yaml", "matplotlib", "onnx")
    modules += ("onnxruntime", "openvino", "sklearn", "pytest")
    info["missing_modules"] = [m for m in modules if importlib.util.find_spec(m) is None]
    kernel = ss._mamba_ssm_kernel()
    info["mamba_ssm"] = (
        "imports" if kernel is not None else f"absent ({'; '.join(ss._MAMBA_SSM_IMPORT_ERROR)})"
    )
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}"
        )
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["driver"] = smi.stdout.strip() or None
    info["auto_backend"] = ss.resolve_backend("auto", torch.device(args.device))
    rec.set(**info)
    return {"ok": True}


def check_tests(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """The tests marked ``cuda`` (skipped without a GPU); pass/fail from pytest's exit status."""
    if args.device != "cuda":
        return {"skipped": "the cuda-marked tests need a GPU"}
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed here"}
    # only the files that hold cuda-marked tests: the others may import packages this machine lacks
    files = sorted(
        str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in f.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda", *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=remaining(args))
    lines = proc.stdout.strip().splitlines()
    return {"ok": proc.returncode == 0, "summary": lines[-1] if lines else "", "tail": proc.stdout[-3000:]}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) or 1.0
    return float((a.float() - b.float()).abs().max()) / scale


SCAN_NAMES = ("y", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")


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


def _scan_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[bool, dict[str, float]]:
    errs = {n: _rel_err(a, b) for n, a, b in zip(SCAN_NAMES, got, want)}
    return errs["y"] < 1e-4 and max(errs.values()) < 2e-3, errs


def check_scan(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """Triton (and mamba-ssm) against ``chunked`` per stage; bit-identical repeated backward; split path."""
    from model.ops import selective_scan_triton as sst
    from model.ops.selective_scan import available_backends

    device = torch.device(args.device)
    backends = ["triton", *(["mamba_ssm"] if "mamba_ssm" in available_backends() else [])]
    big_batch = 16 if args.device == "cuda" else 2
    for shape in stage_shapes(args):
        inputs = _stage_inputs(shape, 4, device)
        weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
        want = _scan_run("chunked", inputs, weight)
        for backend in backends:
            passed, errs = _scan_errors(_scan_run(backend, inputs, weight), want)
            rec.append(
                "rows",
                {"stage": shape["stage"], "backend": backend, "batch": 4, "ok": passed, "rel_err": errs},
            )
        del want
        big = _stage_inputs(shape, big_batch, device)
        weight = torch.randn(big[0].shape, generator=torch.Generator().manual_seed(2)).to(device)
        first = _scan_run("triton", big, weight)
        repeats = BIT_IDENTICAL_REPEATS if args.device == "cuda" else 2
        identical = all(
            all(torch.equal(a, b) for a, b in zip(first, _scan_run("triton", big, weight)))
            for _ in range(repeats - 1)
        )
        row = {"stage": shape["stage"], "backend": "triton", "batch": big_batch, "ok": identical}
        rec.append("rows", {**row, "bit_identical": identical, "repeats": repeats})
        limit = sst._MAX_ELEMENTS
        per_sample = sst._elements_per_sample(
            big[0].shape[1], shape["K"], shape["d_inner"], shape["L"], shape["N"]
        )
        sst._MAX_ELEMENTS = per_sample + 1  # one sample per launch
        try:
            split = _scan_run("triton", big, weight)
        finally:
            sst._MAX_ELEMENTS = limit
        split_err = max(_rel_err(a, b) for a, b in zip(split, first))
        row = {
            "stage": shape["stage"],
            "backend": "triton (split)",
            "batch": big_batch,
            "ok": split_err < 1e-5,
        }
        rec.append("rows", {**row, "rel_err_vs_whole": split_err})
        del big, first, split
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in _ss2d_rows(args.image_size, device, args.width_divisor, args.stages):
        rec.append("rows", row)
    return {"ok": all(r.get("ok", True) for r in rec.data.get("rows", []))}


def _ss2d_rows(
    image_size: int, device: torch.device, divisor: int, stages: Sequence[int] | None
) -> list[dict[str, Any]]:
    """One SS2D module per stage (dims as in the decoder), Triton against ``chunked`` at batch 4."""
    from model.mambaad.scan_orders import ScanOptions
    from model.mambaad.ss2d import SS2D
    from model.ops.selective_scan import forced_backend
    from tools.benchmark import STAGE_DIMS

    rows = []
    for stage, dim in enumerate(STAGE_DIMS):
        if stages is not None and stage not in stages:
            continue
        side = image_size // 32 * 2**stage
        torch.manual_seed(stage)
        dim = max(2, dim // divisor)
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


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn``; on a GPU after one warm-up call (which also compiles)."""
    if device.type == "cuda":
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_launch(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """Triton forward and backward times for each ``num_warps`` at the default block, then for each
    block at the fastest of those, per decoder stage shape at batch 1 and 16; every candidate's
    outputs and gradients checked against ``chunked`` (batch 1) or the default launch (batch 16).
    The fastest correct setting per kernel at batch 16 becomes ``suggested_table``: paste it into
    ``LAUNCH_TABLE`` in ``model/ops/selective_scan_triton.py``."""
    from model.ops import selective_scan_triton as sst

    device = torch.device(args.device)
    batches = LAUNCH_BATCHES if args.device == "cuda" else (1, 2)
    suggested: dict[str, list[int]] = {}
    for shape in stage_shapes(args):
        key = (shape["K"], shape["d_inner"], shape["N"], shape["L"])
        default_block, _ = sst.launch_settings("fwd", *key)
        widest = triton_pow2(shape["d_inner"])
        for batch in batches:
            inputs = _stage_inputs(shape, batch, device)
            weight = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3)).to(device)
            want = _scan_run("chunked" if batch == 1 else "triton", inputs, weight)
            measure = _LaunchTimer(args, rec, shape, batch, inputs, weight, want)
            for warps in WARPS:
                measure(default_block, warps)
            warps = measure.fastest("both")[1] if measure.best else sst.DEFAULT_WARPS
            for block in BLOCKS:
                if block != default_block and block <= widest:
                    measure(block, warps)
            if batch == max(batches):
                for kernel in ("fwd", "bwd"):
                    if measure.best:
                        suggested[repr((kernel, *key))] = list(measure.fastest(kernel))
            del inputs, want, measure
        rec.set(suggested_table=suggested)
    rows = rec.data.get("rows", [])
    return {"ok": bool(rows) and all(r["ok"] for r in rows), "timings_meaningful": args.device == "cuda"}


class _LaunchTimer:
    """Times one scan shape and batch under forced launch settings; keeps the correct ones' times."""

    def __init__(self, args, rec, shape, batch, inputs, weight, want) -> None:
        self.args, self.rec, self.shape, self.batch = args, rec, shape, batch
        self.inputs, self.weight, self.want = inputs, weight, want
        self.best: dict[tuple[int, int], dict[str, float]] = {}

    def __call__(self, block: int, warps: int) -> None:
        from model.ops import selective_scan_triton as sst

        device = torch.device(self.args.device)
        repeats = 5 if device.type == "cuda" else 1
        with sst.forced_launch(block=block, num_warps=warps):
            passed, errs = _scan_errors(_scan_run("triton", self.inputs, self.weight), self.want)
            fwd = _time(lambda: _forward(self.inputs), device, repeats)
            both = _time(lambda: _scan_run("triton", self.inputs, self.weight), device, repeats)
        row = {"stage": self.shape["stage"], "L": self.shape["L"], "batch": self.batch, "block": block}
        row.update(num_warps=warps, ok=passed, max_rel_err=max(errs.values()))
        row.update(forward_ms=fwd * 1e3, backward_ms=max(both - fwd, 0.0) * 1e3)
        self.rec.append("rows", row)
        if passed:
            self.best[(block, warps)] = {"fwd": fwd, "bwd": both - fwd, "both": both}

    def fastest(self, kernel: str) -> tuple[int, int]:
        """``(block, num_warps)`` with the least time for ``kernel`` (``fwd``, ``bwd`` or ``both``)."""
        return min(self.best, key=lambda setting: self.best[setting][kernel])


def triton_pow2(value: int) -> int:
    """The next power of two (Triton's rule for a block dimension)."""
    return 1 << (max(1, value) - 1).bit_length()


def _forward(inputs: list[torch.Tensor]) -> torch.Tensor:
    from model.ops.selective_scan import selective_scan_fn

    with torch.no_grad():
        return selective_scan_fn(*inputs, delta_softplus=True, backend="triton")


def ddp_child(device_name: str, image_size: int) -> dict[str, Any]:
    """One rank under ``torchrun``: the trainer's wrapping (synchronised BatchNorm, then DDP with the
    model's unused parameters excluded) around MambaAD, two training steps with the training loss
    (bf16 autocast on CUDA)."""
    import torch.distributed as dist

    from configs.defaults import MambaADDefaults
    from loss import LOSSES
    from model.mambaad.network import MambaAD
    from trainer.sync_bn import SyncBatchNorm, prepare_ddp
    from util.distributed import init_distributed, shutdown

    ctx = init_distributed(device_name, timeout_s=600)
    if not dist.is_initialized():  # a world of one: init_distributed leaves it alone
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        kwargs = {"device_id": ctx.device} if ctx.device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600), **kwargs)
    cfg = MambaADDefaults()
    criterion = LOSSES.build(cfg.loss.type, weight=cfg.loss.weight)
    torch.manual_seed(0)
    model = MambaAD(teacher="resnet34", image_size=image_size, log=lambda *a: None).to(ctx.device).train()
    model, net = prepare_ddp(model, ctx, sync_bn=True, always=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, finite = [], True
    batch = 8 if ctx.device.type == "cuda" else 2
    for step in range(2):
        x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(step))
        x = x.to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            outputs = net(x)
        loss = sum(model.loss_terms(outputs, {"img": x}, criterion).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finite &= all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss))
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm | SyncBatchNorm) for m in model.modules())
    result = {
        "losses": losses,
        "grads_finite": finite,
        "sync_bn_layers": synced,
        "world_size": dist.get_world_size(),
    }
    result["ddp"] = type(net).__name__
    shutdown()
    return result


def check_ddp(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """A ``torchrun`` job (NCCL on GPUs, up to 2; 2 Gloo ranks on CPU) through the trainer's DDP wrapping."""
    nproc = min(2, torch.cuda.device_count()) if args.device == "cuda" else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(ROOT / "tools" / "gpu_check.py"), "--ddp-child", "--device", args.device]
    cmd += ["--image-size", str(args.image_size)]
    rec.set(nproc=nproc)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=remaining(args))
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    finite = all(v == v and abs(v) != float("inf") for v in result["losses"])
    ok = (
        result["grads_finite"]
        and result["sync_bn_layers"] > 0
        and finite
        and result["ddp"] == "DistributedDataParallel"
    )
    return {"ok": ok, **result}


def check_metrics(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """Torch metrics on a Real-IAD-sized class (2000 maps of 256x256 on a GPU); numpy values on a subset."""
    import numpy as np

    from evaluation.metrics import compute_metrics
    from evaluation.metrics_torch import compute_metrics_torch

    rng = np.random.default_rng(0)
    n, size = (2000, 256) if args.device == "cuda" else (100, 64)
    masks = np.zeros((n, size, size), bool)
    labels = rng.integers(0, 2, n)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - size // 6, 2)
        masks[i, y : y + rng.integers(2, size // 6), x : x + rng.integers(2, size // 6)] = True
    maps = (rng.random((n, size, size), dtype=np.float32) + masks * 0.5).astype(np.float16)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    values = compute_metrics_torch(torch.from_numpy(maps).to(device), masks, labels, device=device)
    _sync(device)
    rec.set(maps=f"{n} x {size}x{size} float16", seconds=time.perf_counter() - start, values=values)
    if device.type == "cuda":
        rec.set(peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30)
    sub = slice(0, min(200, n))
    want = compute_metrics(maps[sub], masks[sub], labels[sub])
    got = compute_metrics_torch(
        torch.from_numpy(maps[sub]).to(device), masks[sub], labels[sub], device=device
    )
    err = max(abs(got[k] - want[k]) for k in want)
    return {"ok": err < 1e-9, "subset_max_abs_diff_vs_numpy": err}


def check_train(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """One epoch of run.py at 256x256, batch 16, Triton scan, bf16 and fp16 autocast."""
    if args.device != "cuda":
        return {
            "skipped": "training under the Triton interpreter would take hours; CPU training is in the tests"
        }
    ok = True
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
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=remaining(args)
            )
            logs = sorted(Path(tmp, "runs").glob("*/log.txt"), key=os.path.getmtime)
            log = logs[-1].read_text() if logs else proc.stdout + proc.stderr
            row = {"amp": amp, "ok": proc.returncode == 0, "seconds": time.perf_counter() - start}
            row["memory_lines"] = [ln.strip() for ln in log.splitlines() if "peak GPU memory" in ln]
            if proc.returncode != 0:
                row["error"] = (proc.stdout + proc.stderr)[-3000:]
            rec.append("rows", row)
            ok &= row["ok"]
    return {"ok": ok}


def check_bench(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """Speed on CUDA: scan op per backend, inference at batch 1 and 16, training step at batch 16.
    Each measurement is recorded on its own; one that fails is recorded as failed and the rest go on."""
    if args.device != "cuda":
        return {"skipped": "CPU speed is tools/benchmark.py's job"}
    from model.ops.selective_scan import available_backends
    from tools.benchmark import bench_inference, bench_scan, bench_train_cuda, stage_shapes

    device = torch.device("cuda")
    backends = [b for b in ("triton", "mamba_ssm", "chunked") if b in available_backends()]
    rec.set(backends=backends)
    jobs: list[tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]] = []
    for shape in stage_shapes(args.image_size):
        for backend in backends:
            jobs.append(
                (
                    "scan",
                    {"backend": backend, **shape},
                    lambda b=backend, s=shape: bench_scan(b, s, 5, device),
                )
            )
    for backend in backends:
        for batch in (1, 16):
            call = lambda b=backend, n=batch: bench_inference(b, args.image_size, 5, device, batch=n)  # noqa: E731
            jobs.append(("inference", {"backend": backend}, call))
    for backend in backends:
        jobs.append(
            (
                "train",
                {"backend": backend},
                lambda b=backend: bench_train_cuda(args.image_size, 16, 3, backend=b),
            )
        )
    for key, row, call in jobs:
        try:
            row = {**row, **call()}
        except torch.OutOfMemoryError:  # chunked keeps every state for backward
            row = {**row, "skipped": "out of GPU memory"}
        except Exception as err:  # one broken measurement must not lose the others
            row = {**row, "failed": f"{type(err).__name__}: {err}"}
        rec.append(key, row)
        torch.cuda.empty_cache()
    failed = [r for key in ("scan", "inference", "train") for r in rec.data.get(key, []) if "failed" in r]
    return {"ok": not failed}


def check_selftest(args: Namespace, rec: Recorder) -> dict[str, Any]:
    """Records one value, then sleeps ``--selftest-sleep`` seconds: how the tests check the budget."""
    rec.set(before_sleep=True)
    time.sleep(args.selftest_sleep)
    return {"ok": True, "after_sleep": True}


SECTIONS: dict[str, Callable[[Namespace, Recorder], dict[str, Any]]] = {
    "env": check_env,
    "tests": check_tests,
    "scan": check_scan,
    "ddp": check_ddp,
    "launch": check_launch,
    "metrics": check_metrics,
    "train": check_train,
    "bench": check_bench,
    "selftest": check_selftest,
}
