"""Export the whole MambaAD inference path to ONNX, OpenVINO IR or TorchScript.

The exported graph takes uint8 RGB images ``images [B, H, W, 3]`` (NHWC, the layout PIL and
NumPy give, no transposition or normalisation on the caller's side) and computes exactly
what ``mambaad.predict`` does after reading and resizing: ImageNet normalisation, teacher,
Half-FPN bottleneck, Mamba decoder, the anomaly map of :mod:`model.anomaly_map` (upsampling,
Gaussian blur) and the image score. Outputs: ``anomaly_map [B, H, W]`` and ``score [B]``,
float32. The selective scan uses the ``export`` backend (standard ONNX operators only; see
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

from data.default_ad import IMAGENET_MEAN, IMAGENET_STD
from model.mamba_decoder import SS2D
from model.ops.selective_scan_export import CHUNK
from util.config import BaseConfig, config_to_dict
from util.errors import UsageError

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


def set_scan_backend(net: nn.Module, backend: str) -> int:
    """Switch every SS2D of ``net`` to the selective-scan ``backend``; returns how many were changed."""
    count = 0
    for module in net.modules():
        if isinstance(module, SS2D):
            module.scan_backend = backend
            count += 1
    return count


def check_image_size(size: int) -> int:
    """The exported input side: a multiple of 32 and at least 64 (the 1/32 bottleneck needs 2x2 cells)."""
    if size < 64 or size % 32:
        raise ExportError(f"--image-size must be a multiple of 32 and at least 64, got {size}")
    return int(size)


def build_graph(net: nn.Module, image_size: int) -> InferenceGraph:
    """The inference graph around ``net`` (switched to the ``export`` scan backend), in eval mode."""
    set_scan_backend(net, EXPORT_BACKEND)
    return InferenceGraph(net.cpu().eval(), (image_size, image_size)).eval()


def _example(image_size: int, batch: int | None) -> torch.Tensor:
    """Random uint8 images to trace with; one image for a dynamic batch (tracing keeps every
    intermediate tensor, about 10 GB per image for the paper model at 256x256)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch or 1, image_size, image_size, 3), dtype=torch.uint8, generator=g)


def export_onnx(graph: InferenceGraph, path: Path, batch: int | None, exporter: str = "torchscript") -> Path:
    """Write ``graph`` as ONNX (opset 17); ``batch=None`` makes the batch dimension dynamic.

    ``exporter``: ``torchscript`` (PyTorch's tracing exporter, about 10x faster to export) or
    ``dynamo`` (``torch.export``-based; needs onnxscript).
    """
    example = _example(graph.image_size[0], batch)
    common = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES), "opset_version": OPSET}
    with warnings.catch_warnings(), torch.no_grad():
        # shape checks in Python are fixed by tracing, as intended (the input size is fixed)
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("batch", min=1)} if batch is None else None
            torch.onnx.export(
                graph, (example,), str(path), dynamo=True, dynamic_shapes={"images": dims}, **common
            )
        elif exporter == "torchscript":
            axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if batch is None else None
            torch.onnx.export(graph, (example,), str(path), dynamo=False, dynamic_axes=axes, **common)
        else:
            raise ExportError(f"unknown ONNX exporter {exporter!r}; use torchscript or dynamo")
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
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    traced.save(str(path))
    return path


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
        "thresholds": None,
        "model": {
            "teacher": cfg.model.teacher.name,
            "depths": list(cfg.model.depths),
            "scan_method": cfg.model.scan.method,
            "scan_directions": cfg.model.scan.directions,
            "scan_backend": EXPORT_BACKEND,
            "scan_chunk": CHUNK,
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

    The model is loaded by :func:`mambaad.load_model` (run folders from their ``config.json``,
    as data). ``image_size`` (default: the config's ``data.image_size``) fixes the exported
    input size; ``batch=None`` exports a dynamic batch dimension.
    """
    from mambaad import load_model

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch is not None and batch < 1:
        raise ExportError(f"--batch must be a positive integer or 'dynamic', got {batch}")
    if fp16 and fmt == "torchscript":
        raise ExportError("--fp16 applies to onnx and openvino (float16 weights, float32 compute)")
    log = log or logging.getLogger("mambaad")
    try:
        detector = load_model(checkpoint, config=config, overrides=overrides, log=log)
    except RuntimeError as err:  # load_weights: the checkpoint's keys or shapes do not fit the config
        raise ExportError(str(err)) from err
    size = check_image_size(image_size or detector.image_size[0])
    graph = build_graph(detector.net, size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder (it is created if needed)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILES[fmt]
    if fmt == "onnx":
        export_onnx(graph, path, batch, exporter)
        if fp16:
            compress_onnx_fp16(path)
    elif fmt == "openvino":
        export_openvino(graph, path, batch, fp16)
    else:
        export_torchscript(graph, path, batch)
    info = metadata(detector.cfg, fmt, path.name, size, batch, fp16, checkpoint)
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
    "export",
    "export_onnx",
    "export_openvino",
    "export_torchscript",
    "normalisation_constants",
    "set_scan_backend",
]
