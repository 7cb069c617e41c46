"""Speed of the selective-scan backends and of the whole model, side by side in one run.

    python tools/benchmark.py --out bench.json [--quick] [--backends cpu ref] [--image-size 256]

Measures (median of ``--repeats`` runs after one warm-up): (1) the scan op at every decoder
stage shape, forward and forward+backward, per backend; (2) full-model inference images/s at
batch 1 per backend and the best backend's speed-up over ``ref``; (3) one training step
(forward, backward, AdamW) at batch 4 with the fastest CPU backend, time and peak RSS, in a
subprocess so the memory peak belongs to that configuration alone; (4) on CUDA, training
images/s at batch 16 with and without bf16 autocast, the peak GPU memory and the implied
duration of the paper's 500-epoch MVTec schedule; (5) with ``--ddp``, data-parallel
training throughput for 1 process vs 2 ``torchrun`` processes (Gloo on CPU, NCCL on GPUs)
at the same global batch; (6) with ``--mmad``, inference and the training step of {full, grouped}
scanning x {Half-FPN, dilated Mamba fuser}; (7) with ``--export``, batch-1 CPU inference of the
whole exported path (normalisation to blurred map and score) in PyTorch (``cpu`` and ``export``
scan backends), onnxruntime and OpenVINO (when installed): median time, model file size and peak RSS, each in
its own process (the runtimes' processes do not import PyTorch). Writes a JSON
and prints a markdown table. Slow pure-PyTorch backends are skipped where one call would
take too long or too much memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.mambaad.network import MambaAD
from model.ops.selective_scan import (
    available_backends,
    forced_backend,
    prepare_cpu,
    resolve_backend,
    selective_scan_fn,
)

ROOT = Path(__file__).resolve().parent.parent

STAGE_DIMS = (512, 256, 128, 64)
K_DIRECTIONS = 8
D_STATE = 16
# Rough peak bytes of a ref/chunked backward per state element (b*K*d*L*N): states, decays,
# inputs and their grads.
_PURE_BYTES_PER_STATE = 40
_MAX_BYTES = 8 * 2**30
_MAX_SECONDS = 60.0
# one warm-up slower than this: keep it as the only measurement
_SLOW_SECONDS = 10.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float | None:
    """Median seconds of ``fn`` after warm-up; None when the first call exceeds ``_MAX_SECONDS``.

    One warm-up call on the CPU, two on CUDA (the first compiles Triton kernels and autotunes
    cuDNN; the second settles the caching allocator), so no compile time is reported as speed.
    """
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda" and first <= _MAX_SECONDS:
        start = time.perf_counter()
        fn()
        _sync(device)
        first = time.perf_counter() - start
    if first > _MAX_SECONDS:
        return None
    if first > _SLOW_SECONDS:
        return first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_shapes(image_size: int) -> list[dict[str, int]]:
    """Scan-op shapes of the four decoder stages (batch 1)."""
    shapes = []
    for i, dim in enumerate(STAGE_DIMS):
        side = image_size // 32 * 2**i
        shapes.append({"stage": i, "L": side * side, "d_inner": 2 * dim, "K": K_DIRECTIONS, "N": D_STATE})
    return shapes


def _scan_inputs(shape: dict[str, int], device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    channels, length, n = shape["K"] * shape["d_inner"], shape["L"], shape["N"]
    tensors = [
        torch.randn(1, channels, length, generator=g),
        torch.randn(1, channels, length, generator=g) * 0.5,
        -torch.rand(channels, n, generator=g) - 0.1,
        torch.randn(1, shape["K"], n, length, generator=g),
        torch.randn(1, shape["K"], n, length, generator=g),
        torch.randn(channels, generator=g),
        torch.randn(channels, generator=g) * 0.3,
    ]
    return [t.to(device).requires_grad_(True) for t in tensors]


def bench_scan(backend: str, shape: dict[str, int], repeats: int, device: torch.device) -> dict:
    """Forward and forward+backward seconds of one scan call, or a skip reason."""
    states = shape["K"] * shape["d_inner"] * shape["L"] * shape["N"]
    if backend in ("ref", "chunked") and states * _PURE_BYTES_PER_STATE > _MAX_BYTES:
        return {"skipped": "memory"}
    inputs = _scan_inputs(shape, device)

    def forward():
        with torch.no_grad():
            return selective_scan_fn(*inputs, delta_softplus=True, backend=backend)

    def forward_backward():
        selective_scan_fn(*inputs, delta_softplus=True, backend=backend).sum().backward()

    fwd = time_call(forward, repeats, device)
    if fwd is None:
        return {"skipped": "time"}
    fwd_bwd = time_call(forward_backward, repeats, device) if fwd * 3 < _MAX_SECONDS else None
    if fwd_bwd is None:
        return {"forward_s": fwd, "skipped": "time (backward)"}
    return {"forward_s": fwd, "forward_backward_s": fwd_bwd}


def build_model(
    image_size: int, backend: str, device: torch.device, grouped: bool = False, bottleneck: str = "hfpn"
) -> MambaAD:
    """The paper model with a random teacher (speed does not depend on the weights); ``grouped``
    and ``bottleneck`` select the MMAD-style options (``model.scan.grouped``,
    ``model.bottleneck.type``; the fuser's rates are 1 and 2 below 256x256 input, else 2 and 4)."""
    scan = {"backend": backend, "grouped": grouped}
    rates = [2, 4] if image_size >= 256 else [1, 2]
    neck = {"type": bottleneck, "dilations": rates}
    model = MambaAD(
        teacher="resnet34", image_size=image_size, scan=scan, bottleneck=neck, log=lambda *a: None
    )
    return model.to(device)


def bench_inference(
    backend: str,
    image_size: int,
    repeats: int,
    device: torch.device,
    batch: int = 1,
    grouped: bool = False,
    bottleneck: str = "hfpn",
) -> dict:
    """Images/s of ``model(x)`` at ``batch`` in eval mode without grad."""
    model = build_model(image_size, backend, device, grouped, bottleneck).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def run():
        with torch.no_grad():
            model(x)

    seconds = time_call(run, repeats, device)
    if seconds is None:
        return {"skipped": "time"}
    return {"batch": batch, "seconds_per_image": seconds / batch, "images_per_s": batch / seconds}


def _train_step_fn(model: MambaAD, x: torch.Tensor, autocast: bool) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            feats_t, feats_s = model(x)
            loss = sum(F.mse_loss(s.float(), t.float()) for t, s in zip(feats_t, feats_s))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def train_child(
    backend: str, image_size: int, batch: int, repeats: int, grouped: bool = False, bottleneck: str = "hfpn"
) -> dict:
    """Run in a fresh process: training-step seconds and this process's peak RSS."""
    device = torch.device("cpu")
    model = build_model(image_size, backend, device, grouped, bottleneck).train()
    x = torch.randn(batch, 3, image_size, image_size)
    seconds = time_call(_train_step_fn(model, x, autocast=False), repeats, device)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds_per_step": seconds, "peak_rss_mib": peak_kib / 1024}


def bench_train_cpu(
    backend: str, image_size: int, batch: int, repeats: int, grouped: bool = False, bottleneck: str = "hfpn"
) -> dict:
    """Training step at ``batch`` on the CPU, measured in a subprocess (per-configuration RSS)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--train-child",
        backend,
        "--image-size",
        str(image_size),
        "--batch",
        str(batch),
        "--repeats",
        str(repeats),
        *(["--grouped"] if grouped else []),
        "--bottleneck",
        bottleneck,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"training benchmark failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["children_max_rss_mib"] = children_kib / 1024
    if result["seconds_per_step"] is None:
        return {"backend": backend, "batch": batch, "skipped": "time"}
    return {"backend": backend, "batch": batch, **result}


def bench_train_cuda(image_size: int, batch: int, repeats: int, backend: str = "auto") -> dict:
    """Training images/s at ``batch`` on the GPU, fp32 and bf16 autocast, with peak memory."""
    device = torch.device("cuda")
    out = {"batch": batch, "backend": backend, "resolved_backend": resolve_backend(backend, device)}
    for name, autocast in (("fp32", False), ("bf16_autocast", True)):
        model = build_model(image_size, backend, device).train()
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds = time_call(_train_step_fn(model, x, autocast), repeats, device)
        ips = None if seconds is None else batch / seconds
        out[name] = {
            "images_per_s": ips,
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "paper_schedule_hours": None if not ips else MVTEC_TRAIN_IMAGES * PAPER_EPOCHS / ips / 3600,
        }
        del model, x
        torch.cuda.empty_cache()
    return out


MMAD_VARIANTS = ((False, "hfpn"), (True, "hfpn"), (False, "dilated_mamba"), (True, "dilated_mamba"))


def bench_mmad(backend: str, image_size: int, repeats: int, device: torch.device) -> list[dict]:
    """Inference (batch 1) and training step (batch 4; on CUDA batch 16) of the MMAD-style variants."""
    rows = []
    for grouped, neck in MMAD_VARIANTS:
        row = {"grouped": grouped, "bottleneck": neck, "backend": backend, "device": device.type}
        row["inference"] = bench_inference(backend, image_size, repeats, device, 1, grouped, neck)
        if device.type == "cuda":
            model = build_model(image_size, backend, device, grouped, neck).train()
            x = torch.randn(16, 3, image_size, image_size, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            seconds = time_call(_train_step_fn(model, x, autocast=False), repeats, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            row["train"] = {"batch": 16, "seconds_per_step": seconds, "peak_memory_mib": peak}
        else:
            row["train"] = bench_train_cpu(backend, image_size, 4, max(1, min(repeats, 3)), grouped, neck)
        rows.append(row)
    return rows


MVTEC_TRAIN_IMAGES = 3629
PAPER_EPOCHS = 500


def ddp_child(image_size: int, batch: int, repeats: int) -> dict:
    """One rank of the data-parallel throughput run: a global ``batch`` split over the ranks."""
    from util.distributed import init_distributed, shutdown, wrap_ddp

    ctx = init_distributed("auto")
    if ctx.device.type == "cpu":
        prepare_cpu()  # flush denormals, start Numba keeping OMP_NUM_THREADS
    model = build_model(image_size, "auto", ctx.device).train()
    net = wrap_ddp(model, ctx)
    x = torch.randn(batch // ctx.world_size, 3, image_size, image_size, device=ctx.device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step():
        feats_t, feats_s = net(x)
        loss = sum(F.mse_loss(s, t) for t, s in zip(feats_t, feats_s))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = time_call(step, repeats, ctx.device)
    shutdown()
    return {"processes": ctx.world_size, "images_per_s": None if seconds is None else batch / seconds}


def bench_ddp(image_size: int, batch: int, repeats: int) -> dict:
    """Training images/s at one global batch: 1 process vs 2 torchrun processes, same cores in total."""
    child = [str(Path(__file__).resolve()), "--ddp-child", "--image-size", str(image_size)]
    child += ["--batch", str(batch), "--repeats", str(repeats)]
    cores = os.cpu_count() or 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    rows = []
    for launcher, threads in (([sys.executable], cores), (torchrun, max(1, cores // 2))):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(
            [*launcher, *child], capture_output=True, text=True, check=False, cwd=ROOT, env=env
        )
        if proc.returncode != 0:
            raise RuntimeError(f"data-parallel benchmark failed:\n{proc.stderr[-2000:]}")
        rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "threads_per_process": threads})
    one, two = rows
    ratio = None
    if one["images_per_s"] and two["images_per_s"]:
        ratio = two["images_per_s"] / one["images_per_s"]
    return {"batch": batch, "runs": rows, "two_vs_one": ratio}


EXPORT_ENGINES = ("pytorch", "pytorch-export", "onnxruntime", "openvino")


def export_child(image_size: int, out_dir: str) -> dict:
    """Run in a fresh process: export the paper model (random weights) to ONNX and OpenVINO IR."""
    from deploy.export import build_graph, export_onnx

    out = Path(out_dir)
    torch.manual_seed(0)
    model = build_model(image_size, "cpu", torch.device("cpu")).eval()
    torch.save(model.state_dict(), out / "net.pth")
    graph = build_graph(model, image_size)
    start = time.perf_counter()
    export_onnx(graph, out / "model.onnx", batch=None)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"onnx_export_s": time.perf_counter() - start, "onnx_export_peak_rss_mib": peak_mib}
    try:
        import openvino as ov
    except ImportError:
        return result
    start = time.perf_counter()
    ov.save_model(ov.convert_model(str(out / "model.onnx")), str(out / "model.xml"), compress_to_fp16=False)
    result["openvino_convert_s"] = time.perf_counter() - start
    return result


def torch_infer_child(engine: str, image_size: int, repeats: int) -> dict:
    """Run in a fresh process: the whole inference path in PyTorch, batch 1, and the peak RSS."""
    from deploy.export import InferenceGraph

    torch.manual_seed(0)
    graph = InferenceGraph(build_model(image_size, "cpu", torch.device("cpu")).eval(), (image_size,) * 2)
    backend = "export" if engine == "pytorch-export" else "auto"
    images = torch.randint(0, 256, (1, image_size, image_size, 3), dtype=torch.uint8)

    def run():
        with torch.no_grad(), forced_backend(backend):
            graph(images)

    seconds = time_call(run, repeats, torch.device("cpu"))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_s": seconds, "peak_rss_mib": peak_kib / 1024}


def _child_json(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_export(image_size: int, repeats: int) -> dict:
    """Batch-1 CPU inference of the exported path per engine: seconds, model file MB, peak RSS."""
    import tempfile

    script = str(Path(__file__).resolve())
    size = ["--image-size", str(image_size)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        exported = _child_json([sys.executable, script, "--export-child", tmp, *size], "export")
        files = {
            "pytorch": [folder / "net.pth"],
            "pytorch-export": [folder / "net.pth"],
            "onnxruntime": [folder / "model.onnx"],
            "openvino": [folder / "model.xml", folder / "model.bin"],
        }
        rows = []
        for engine in EXPORT_ENGINES:
            if not all(p.is_file() for p in files[engine]):
                rows.append({"engine": engine, "skipped": "not installed"})
                continue
            if engine.startswith("pytorch"):
                cmd = [sys.executable, script, "--infer-child", engine, *size, "--repeats", str(repeats)]
            else:
                model = files[engine][0]
                cmd = [sys.executable, "-m", "deploy.runtime", str(model), "--benchmark", str(repeats)]
            result = _child_json(cmd, f"{engine} inference")
            mb = sum(p.stat().st_size for p in files[engine]) / 1e6
            rows.append({"engine": engine, "model_mb": mb, **result})
    return {"image_size": image_size, "batch": 1, "repeats": repeats, **exported, "rows": rows}


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    return info


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def markdown_table(report: dict) -> str:
    """One table with every measurement."""
    lines = ["| measurement | backend | shape | value |", "|---|---|---|---|"]
    for row in report["scan"]:
        shape = f"stage {row['stage']}: L={row['L']}, K*d={row['K'] * row['d_inner']}, N={row['N']}"
        shape += f" ({row['device']})"
        if "forward_s" in row:
            lines.append(
                f"| scan forward (ms) | {row['backend']} | {shape} | {_fmt(row['forward_s'] * 1e3)} |"
            )
        if "forward_backward_s" in row:
            value = _fmt(row["forward_backward_s"] * 1e3)
            lines.append(f"| scan fwd+bwd (ms) | {row['backend']} | {shape} | {value} |")
        if "skipped" in row:
            lines.append(f"| scan | {row['backend']} | {shape} | skipped ({row['skipped']}) |")
    size = report["image_size"]
    for row in report["inference"]:
        value = f"skipped ({row['skipped']})" if "skipped" in row else _fmt(row["images_per_s"])
        lines.append(
            f"| inference images/s, batch 1 | {row['backend']} | {size}x{size} ({row['device']}) | {value} |"
        )
    if report.get("speedup_vs_ref"):
        s = report["speedup_vs_ref"]
        lines.append(f"| inference speed-up vs ref | {s['backend']} | {size}x{size} | {s['ratio']:.1f}x |")
    train = report.get("train_cpu")
    if train:
        shape = f"{size}x{size}, batch {train['batch']}"
        if "skipped" in train:
            lines.append(f"| CPU train step | {train['backend']} | {shape} | skipped ({train['skipped']}) |")
        else:
            lines.append(
                f"| CPU train step (s) | {train['backend']} | {shape} | {_fmt(train['seconds_per_step'])} |"
            )
            lines.append(
                f"| CPU train peak RSS (MiB) | {train['backend']} | {shape} | {train['peak_rss_mib']:.0f} |"
            )
    cuda = report.get("train_cuda")
    if cuda:
        shape = f"{size}x{size}, batch {cuda['batch']}"
        backend = f"auto ({cuda['resolved_backend']})"
        for name in ("fp32", "bf16_autocast"):
            value = _fmt(cuda[name]["images_per_s"])
            lines.append(f"| GPU train images/s ({name}) | {backend} | {shape} | {value} |")
            mem = f"{cuda[name]['peak_memory_mib']:.0f}"
            lines.append(f"| GPU train peak memory MiB ({name}) | {backend} | {shape} | {mem} |")
            hours = _fmt(cuda[name]["paper_schedule_hours"], 3)
            lines.append(f"| 500 MVTec epochs, hours ({name}) | {backend} | {shape} | {hours} |")
    for row in report.get("mmad", []):
        what = f"{row['backend']}, {'grouped' if row['grouped'] else 'full'} scan, {row['bottleneck']}"
        inf, train = row["inference"], row["train"]
        lines.append(
            f"| inference images/s, batch 1 | {what} | {size}x{size} | {_fmt(inf.get('images_per_s'))} |"
        )
        step = train.get("seconds_per_step")
        memory = train.get("peak_rss_mib", train.get("peak_memory_mib"))
        shape = f"{size}x{size}, batch {train.get('batch', '-')}"
        lines.append(f"| train step (s) | {what} | {shape} | {_fmt(step)} |")
        lines.append(f"| train peak memory (MiB) | {what} | {shape} | {_fmt(memory)} |")
    exp = report.get("export")
    if exp:
        shape = f"{exp['image_size']}x{exp['image_size']}, batch 1 (cpu)"
        for row in exp["rows"]:
            where = f"{row['engine']} | {shape}"
            if "skipped" in row:
                lines.append(f"| exported inference | {where} | skipped ({row['skipped']}) |")
                continue
            lines.append(f"| exported inference (s/image) | {where} | {_fmt(row['median_s'])} |")
            lines.append(f"| exported model file (MB) | {where} | {row['model_mb']:.1f} |")
            lines.append(f"| exported peak RSS (MiB) | {where} | {row['peak_rss_mib']:.0f} |")
    ddp = report.get("train_ddp")
    if ddp:
        shape = f"{size}x{size}, global batch {ddp['batch']}"
        for row in ddp["runs"]:
            value = _fmt(row["images_per_s"])
            lines.append(f"| train images/s, {row['processes']} process(es) | auto | {shape} | {value} |")
        if ddp["two_vs_one"]:
            lines.append(f"| 2 processes vs 1 | auto | {shape} | {ddp['two_vs_one']:.2f}x |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """All measurements for the parsed command line."""
    image_size = args.image_size or (128 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 5)
    backends = args.backends or available_backends()
    unknown = sorted(set(backends) - set(available_backends()))
    if unknown:
        raise SystemExit(f"backends not available here: {unknown}; available: {available_backends()}")
    gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def device_for(backend: str) -> torch.device:
        return torch.device("cpu") if backend == "cpu" else gpu

    report: dict = {"machine": machine_info(), "image_size": image_size, "repeats": repeats}
    report["scan"] = []
    for shape in stage_shapes(image_size):
        for backend in backends:
            result = bench_scan(backend, shape, repeats, device_for(backend))
            report["scan"].append({"backend": backend, "device": device_for(backend).type, **shape, **result})
    report["inference"] = []
    for backend in backends:
        result = bench_inference(backend, image_size, repeats, device_for(backend))
        report["inference"].append({"backend": backend, "device": device_for(backend).type, **result})
    measured = {r["backend"]: r["images_per_s"] for r in report["inference"] if "images_per_s" in r}
    if "ref" in measured and measured:
        best = max(measured, key=measured.get)
        report["speedup_vs_ref"] = {"backend": best, "ratio": measured[best] / measured["ref"]}
    cpu_backends = [b for b in ("cpu", "chunked", "ref") if b in backends]
    if cpu_backends and not args.no_train:
        report["train_cpu"] = bench_train_cpu(cpu_backends[0], image_size, 4, max(1, min(repeats, 3)))
    if torch.cuda.is_available() and not args.no_train:
        report["train_cuda"] = bench_train_cuda(image_size, 16, repeats)
    if args.mmad:
        report["mmad"] = bench_mmad(backends[0], image_size, repeats, device_for(backends[0]))
    if args.export:
        report["export"] = bench_export(image_size, repeats)
    if args.ddp:
        batch = 16 if torch.cuda.is_available() else 4
        report["train_ddp"] = bench_ddp(image_size, batch, max(1, min(repeats, 3)))
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="image size 128 and 2 repeats by default")
    parser.add_argument("--backends", nargs="+", help="scan backends (default: all available)")
    parser.add_argument("--image-size", type=int, help="input size (default 256, 128 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median reported)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ddp",
        action="store_true",
        help="also time training in 1 vs 2 torchrun processes (same global batch)",
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="also time batch-1 CPU inference of the exported model: PyTorch, onnxruntime, OpenVINO",
    )
    parser.add_argument(
        "--mmad",
        action="store_true",
        help="also time inference and the training step for {full, grouped} scanning x "
        "{Half-FPN, dilated Mamba fuser}",
    )
    parser.add_argument("--grouped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bottleneck", default="hfpn", help=argparse.SUPPRESS)
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    parser.add_argument("--infer-child", help=argparse.SUPPRESS)
    parser.add_argument("--train-child", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write the JSON, print the table; returns the report."""
    args = parse_args(argv)
    if args.ddp_child:
        result = ddp_child(args.image_size, args.batch, args.repeats)
        if result["processes"] == 1 or os.environ.get("RANK") == "0":
            print(json.dumps(result))
        return {}
    if args.export_child:
        print(json.dumps(export_child(args.image_size, args.export_child)))
        return {}
    if args.infer_child:
        prepare_cpu()
        print(json.dumps(torch_infer_child(args.infer_child, args.image_size, args.repeats)))
        return {}
    if args.train_child:
        prepare_cpu()  # flush denormals, start Numba keeping OMP_NUM_THREADS
        result = train_child(
            args.train_child, args.image_size, args.batch, args.repeats, args.grouped, args.bottleneck
        )
        print(json.dumps(result))
        return {}
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown_table(report))
    return report


if __name__ == "__main__":
    main()
