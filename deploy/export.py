"""Export the whole MambaAD inference path to ONNX, OpenVINO IR or TorchScript.

The exported graph takes uint8 RGB images ``images [B, H, W, 3]`` (NHWC, the layout PIL and
NumPy give, no transposition or normalisation on the caller's side) and computes exactly
what ``mambaad.predict`` does after reading and resizing: ImageNet normalisation, teacher,
Half-FPN bottleneck, Mamba decoder, the anomaly map of :mod:`model.anomaly_map` (upsampling,
Gaussian blur) and the image score. Outputs: ``anomaly_map [B, H, W]`` and ``score [B]``,
float32. The selective scan uses the ``export`` backend: in ONNX (and the OpenVINO IR made
from it) one standard ``Scan`` operator per scan, in TorchScript plain tensor ops (see
:mod:`model.ops.selective_scan_export`). A ``model.json`` beside the model describes the
input, the normalisation, the training data and where the model came from.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data import as_hw
from data.default_ad import IMAGENET_MEAN, IMAGENET_STD
from deploy.runtime import read_thresholds
from model.input_size import input_hw
from model.loading import load_network
from model.ops.selective_scan import forced_backend
from model.ops.selective_scan_export import (
    CHUNK,
    ONNX_DOMAIN,
    STEPS_PER_ITERATION,
    expand_onnx_placeholders,
    onnx_placeholders,
)
from util.config import BaseConfig, config_to_dict
from util.errors import DiskFullError, UsageError, is_disk_full, make_folder

FORMATS = ("onnx", "openvino", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
METADATA_FILE = "model.json"
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
OPSET = 17
EXPORT_BACKEND = "export"
REPO = Path(__file__).resolve().parent.parent


class ExportError(UsageError):
    """The export cannot be done as asked (bad option, checkpoint that does not fit the config)."""


def normalisation_constants() -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` float32 [3] with ``x * scale - shift == (x / 255 - mean) / std``.

    Computed with the same float32 operations as :mod:`data.default_ad`, so the exported
    normalisation gives the same bits as the data pipeline.
    """
    std = np.asarray(IMAGENET_STD, np.float32)
    scale = 1.0 / (255.0 * std)
    shift = np.asarray(IMAGENET_MEAN, np.float32) / std
    return scale.astype(np.float32), shift.astype(np.float32)


class InferenceGraph(nn.Module):
    """uint8 RGB ``[B, H, W, 3]`` -> ``(anomaly_map [B, H, W], score [B])``, the whole inference path."""

    def __init__(self, net: nn.Module, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.image_size = (int(image_size[0]), int(image_size[1]))
        scale, shift = normalisation_constants()
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift
        return self.net.predict(x, self.image_size)


def check_image_size(size: int) -> int:
    """The exported input side, checked against the model's rule (:mod:`model.input_size`)."""
    try:
        return input_hw(size, "--image-size")[0]
    except ValueError as err:
        raise ExportError(str(err)) from err


def build_graph(net: nn.Module, image_size: int) -> InferenceGraph:
    """The inference graph around ``net``, in eval mode; it is traced with the ``export`` scan
    backend (:func:`model.ops.selective_scan.forced_backend`)."""
    return InferenceGraph(net.cpu().eval(), (image_size, image_size)).eval()


def _example(image_size: int, batch: int | None) -> torch.Tensor:
    """Random uint8 images to trace with; one image for a dynamic batch (tracing keeps every
    intermediate tensor, about 10 GB per image for the paper model at 256x256)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch or 1, image_size, image_size, 3), dtype=torch.uint8, generator=g)


def _matmul_operands(equation: str) -> tuple[int, int] | None:
    """``(i, j)`` when ``einsum(equation, x0, x1) == matmul(x_i, x_j)`` (broadcast batch dims), else None.

    E.g. SS2D's projections ``bkdl,kcd->bkcl`` and ``bkrl,kdr->bkdl`` give ``(1, 0)``.
    """
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if not arrow or "." in equation or len(operands) != 2:
        return None
    for i, j in ((0, 1), (1, 0)):
        p, q = operands[i], operands[j]
        if min(len(p), len(q), len(out)) < 2 or len({*p}) != len(p) or len({*q}) != len(q):
            continue
        (m, inner), (inner_q, n) = p[-2:], q[-2:]
        batch_p, batch_q = p[:-2], q[:-2]
        batch, shorter = (batch_p, batch_q) if len(batch_p) >= len(batch_q) else (batch_q, batch_p)
        if (
            inner == inner_q
            and batch.endswith(shorter)  # broadcast batch dims align from the right
            and out == batch + m + n
            and len({*out}) == len(out)
            and m not in q
            and n not in p
        ):
            return i, j
    return None


def einsums_to_matmul(model: Any) -> int:
    """Replace the ``Einsum`` nodes of an ONNX model that are batched matrix products by ``MatMul``.

    onnxruntime runs SS2D's two projections as Einsum about as slowly as the whole rest of
    the decoder (11 % of the time in a profile of the paper model at 256x256); as MatMul they
    are ordinary batched GEMMs. Returns how many nodes were replaced.
    """
    from onnx import helper

    count = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx"):
            continue
        equation = helper.get_attribute_value(node.attribute[0])
        order = _matmul_operands(equation.decode() if isinstance(equation, bytes) else equation)
        if order is None:
            continue
        inputs = [node.input[order[0]], node.input[order[1]]]
        model.graph.node[index].CopyFrom(
            helper.make_node("MatMul", inputs, list(node.output), name=node.name)
        )
        count += 1
    return count


def export_onnx_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Trace ``module`` to ONNX (opset 17) with the ``export`` scan backend: every selective scan as
    one standard ``Scan`` operator (:func:`model.ops.selective_scan_export.scan_onnx_nodes`), the
    scan orders as channel-vector Gathers (:func:`model.ops.selective_scan_export.gather_scan_encode`)
    and batched-matmul Einsums as MatMul; the file holds standard operators only."""
    import onnx

    with (
        forced_backend(EXPORT_BACKEND),
        onnx_placeholders(),
        warnings.catch_warnings(),
        torch.no_grad(),
    ):
        # shape checks in Python are fixed by tracing, as intended (the input size is fixed)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            custom_opsets={ONNX_DOMAIN: 1},
        )
    model = onnx.load(str(path))
    expand_onnx_placeholders(model)
    einsums_to_matmul(model)
    onnx.save(model, str(path))
    return path


def export_onnx(graph: InferenceGraph, path: Path, batch: int | None, exporter: str = "torchscript") -> Path:
    """Write ``graph`` as ONNX (opset 17); ``batch=None`` makes the batch dimension dynamic.

    ``exporter``: ``torchscript`` (PyTorch's tracing exporter, every scan one ONNX ``Scan``; see
    :func:`export_onnx_module`) or ``dynamo`` (``torch.export``-based, needs onnxscript; the scans
    stay in the blocked plain-op form, several times slower to run).
    """
    example = _example(graph.image_size[0], batch)
    if exporter == "torchscript":
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if batch is None else None
        return export_onnx_module(graph, (example,), path, [INPUT_NAME], OUTPUT_NAMES, axes)
    if exporter != "dynamo":
        raise ExportError(f"unknown ONNX exporter {exporter!r}; use torchscript or dynamo")
    common = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES), "opset_version": OPSET}
    dims = {0: torch.export.Dim("batch", min=1)} if batch is None else None
    with forced_backend(EXPORT_BACKEND), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), dynamo=True, dynamic_shapes={"images": dims}, **common
        )
    return path


def compress_onnx_fp16(path: Path) -> int:
    """Store the float32 weights of an ONNX file as float16, each followed by a Cast back to float32.

    Computation stays float32 (onnxruntime folds the casts at load time); the file halves.
    Returns the number of tensors converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= 16:
            values = np.clip(numpy_helper.to_array(init), -65504, 65504).astype(np.float16)
            half = numpy_helper.from_array(values, f"{init.name}__fp16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(model, str(path))
    return len(casts)


def export_openvino(graph: InferenceGraph, path: Path, batch: int | None, fp16: bool) -> Path:
    """Write OpenVINO IR (``path`` .xml + .bin), converted from an ONNX export of ``graph``."""
    try:
        import openvino as ov
    except ImportError as err:
        raise ExportError("--format openvino needs the openvino package (pip install openvino)") from err
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(graph, Path(tmp) / "model.onnx", batch)
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(path), compress_to_fp16=fp16)
    return path


def export_torchscript(graph: InferenceGraph, path: Path, batch: int | None = None) -> Path:
    """Write a traced TorchScript module (input and outputs as in the ONNX export; any batch size)."""
    example = _example(graph.image_size[0], batch)
    with forced_backend(EXPORT_BACKEND), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    # PyTorch's archive writer aborts the process when the disk fills up while it writes a
    # file; serialised in memory, the write is Python's and fails with an OSError instead
    path.write_bytes(traced.save_to_buffer())
    return path


def scan_form(fmt: str, exporter: str = "torchscript") -> str:
    """How the selective scans appear in the exported file (recorded in ``model.json``)."""
    if fmt != "torchscript" and exporter == "torchscript":
        return f"ONNX Scan operator, up to {STEPS_PER_ITERATION} steps per iteration"
    return f"blocked scan in plain tensor ops, chunks of {CHUNK} steps"


def config_hash(cfg: BaseConfig) -> str:
    """SHA-256 of the resolved config without the checkpoint path (so a copied file hashes the same)."""
    data = config_to_dict(cfg)
    data.get("model", {}).pop("checkpoint", None)
    for key in ("_overridden", "config_file", "name", "output_dir"):
        data.pop(key, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def project_version() -> str:
    """``git <commit>`` of this checkout (read-only ``git rev-parse``), else ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {out.stdout.strip()}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def metadata(
    cfg: BaseConfig,
    fmt: str,
    model_file: str,
    image_size: int,
    batch: int | None,
    fp16: bool,
    checkpoint: str | Path,
    exporter: str = "torchscript",
) -> dict[str, Any]:
    """What ``model.json`` records: input contract, normalisation, training data, provenance."""
    scale, shift = normalisation_constants()
    classes = cfg.data.cls_names
    return {
        "format": fmt,
        "model_file": model_file,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch, image_size, image_size, 3],
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "batch": "dynamic" if batch is None else batch,
            "resize": "bilinear (PIL Image.resize, BILINEAR) to image_size, as in training",
        },
        "outputs": {
            "anomaly_map": {"shape": [batch, image_size, image_size], "dtype": "float32"},
            "score": {"shape": [batch], "dtype": "float32", "definition": "max of anomaly_map"},
        },
        "image_size": [image_size, image_size],
        "normalization": {
            "in_graph": True,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "formula": "x_uint8 * scale - shift == (x / 255 - mean) / std",
            "scale": scale.tolist(),
            "shift": shift.tolist(),
        },
        "anomaly_map": {"sigma": float(cfg.model.sigma), "upsampling": "bilinear, align_corners=True"},
        "training_data": {
            "config": getattr(cfg, "name", None),
            "root": cfg.data.root,
            "classes": None if classes is None else list(classes),
            "trained_image_size": cfg.data.image_size,
        },
        "thresholds": read_thresholds(checkpoint),
        "model": {
            "teacher": cfg.model.teacher.name,
            "depths": list(cfg.model.depths),
            "scan_method": cfg.model.scan.method,
            "scan_directions": cfg.model.scan.directions,
            "scan_backend": EXPORT_BACKEND,
            "scan_form": scan_form(fmt, exporter),
        },
        "weights_fp16": bool(fp16),
        "checkpoint": str(checkpoint),
        "config_hash": config_hash(cfg),
        "project_version": project_version(),
        "exported_with": {"torch": torch.__version__, "onnx_opset": OPSET if fmt != "torchscript" else None},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    fmt: str = "onnx",
    config: str | Path | BaseConfig | None = None,
    overrides: Sequence[str] = (),
    image_size: int | None = None,
    batch: int | None = None,
    fp16: bool = False,
    exporter: str = "torchscript",
    log: logging.Logger | None = None,
) -> Path:
    """Export a checkpoint (or run folder) to ``out_dir`` and write ``model.json``; returns the model file.

    The model is loaded by :func:`model.loading.load_network` (run folders from their
    ``config.json``, as data), as :func:`mambaad.load_model` loads it. ``image_size`` (default: the
    config's ``data.image_size``) fixes the exported input size; ``batch=None`` exports a dynamic
    batch dimension.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch is not None and batch < 1:
        raise ExportError(f"--batch must be a positive integer or 'dynamic', got {batch}")
    if fp16 and fmt == "torchscript":
        raise ExportError("--fp16 applies to onnx and openvino (float16 weights, float32 compute)")
    log = log or logging.getLogger("mambaad")
    try:
        net, cfg, _ = load_network(checkpoint, config=config, overrides=overrides, log=log)
    except RuntimeError as err:  # load_weights: the checkpoint's keys or shapes do not fit the config
        raise ExportError(str(err)) from err
    if cfg.model.type != "mambaad":
        raise ExportError(
            f"the export covers MambaAD only, and {checkpoint} holds a {cfg.model.type} model; score it "
            "with tools/predict.py or the Python API (mambaad.load_model), which take every method"
        )
    h, w = as_hw(cfg.data.image_size)
    if h != w and not image_size:
        raise ExportError(
            f"the model was configured for {h}x{w} inputs, and the export builds square graphs only; "
            f"pass --image-size N for an N x N graph, or export a model trained at a square size"
        )
    size = check_image_size(image_size or h)
    graph = build_graph(net, size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder (it is created if needed)")
    make_folder(out, "--out")
    path = out / MODEL_FILES[fmt]
    try:
        if fmt == "onnx":
            export_onnx(graph, path, batch, exporter)
            if fp16:
                compress_onnx_fp16(path)
        elif fmt == "openvino":
            export_openvino(graph, path, batch, fp16)
        else:
            export_torchscript(graph, path, batch)
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(path, f"free some space in {out}, then export again") from err
        raise
    info = metadata(cfg, fmt, path.name, size, batch, fp16, checkpoint, exporter)
    if info["thresholds"] is None:
        log.info(
            "no thresholds.json beside %s: model.json carries no thresholds (evaluate the run or "
            "use tools/calibrate.py, then export again)",
            checkpoint,
        )
    elif size != as_hw(cfg.data.image_size)[0]:
        log.warning(
            "the thresholds of %s were calibrated on %s maps and the export is %dx%d: "
            "calibrate again at that size",
            checkpoint,
            cfg.data.image_size,
            size,
            size,
        )
    info["model_sha256"] = file_sha256(path)
    info["model_bytes"] = sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file())
    (out / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("exported %s (%.1f MB) and %s to %s", path.name, info["model_bytes"] / 1e6, METADATA_FILE, out)
    return path


__all__ = [
    "FORMATS",
    "ExportError",
    "InferenceGraph",
    "build_graph",
    "compress_onnx_fp16",
    "einsums_to_matmul",
    "export",
    "export_onnx",
    "export_onnx_module",
    "export_openvino",
    "export_torchscript",
    "normalisation_constants",
]
