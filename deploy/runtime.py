"""Run an exported MambaAD model without PyTorch: onnxruntime (``model.onnx``) or OpenVINO (``model.xml``).

    from deploy.runtime import load_exported
    model = load_exported("export/model.onnx")          # or the folder, or export/model.xml
    maps, scores = model.predict(["a.png", pil_image, uint8_array])

Needs only NumPy, Pillow and onnxruntime (or openvino); this module imports nothing from the
rest of the project, so it can be copied next to the model. Images are read and resized as
in training and evaluation (RGB, Pillow bilinear resize to the model's input size); the
graph itself normalises them and computes the blurred anomaly maps and the scores, so the
results equal ``mambaad.predict`` (see docs/deploy.md for the measured differences).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

ImageInput = str | Path | Image.Image | np.ndarray
METADATA_FILE = "model.json"
MODEL_FILES = ("model.onnx", "model.xml")

__all__ = [
    "Decision",
    "ExportedModel",
    "ModelFileError",
    "Prediction",
    "decide",
    "load_exported",
    "load_onnx",
    "load_openvino",
    "main",
    "read_image",
    "read_thresholds",
    "resize_map",
    "thresholds_for",
    "to_rgb",
]
THRESHOLDS_FILE = "thresholds.json"


class ModelFileError(ValueError):
    """An exported model file that the runtime cannot load (damaged, not a MambaAD export, or
    another runtime's format); the message names the file and what to do."""


def _unloadable(path: Path, runtime: str, err: BaseException) -> ModelFileError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelFileError(
        f"{path} cannot be loaded by {runtime} ({first}); it is damaged or not an exported model: "
        "export it again with tools/export.py"
    )


class Prediction(NamedTuple):
    """Anomaly maps ``[N, H, W]`` and image scores ``[N]`` (float32); unpacks as ``maps, scores``."""

    maps: np.ndarray
    scores: np.ndarray


class Decision(NamedTuple):
    """Labels and masks from thresholds: ``labels [N]`` bool (True = anomalous), ``masks [N, H, W]``
    bool at the maps' size, the thresholds used per image and where each came from."""

    labels: np.ndarray
    masks: np.ndarray
    image_thresholds: np.ndarray
    pixel_thresholds: np.ndarray
    sources: list[str]


def read_thresholds(path: str | Path) -> dict[str, Any] | None:
    """The thresholds of a run folder (its ``thresholds.json``; a file inside it: its folder's), else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / THRESHOLDS_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelFileError(
            f"{file} is not valid JSON ({err}); delete it and evaluate again or run tools/calibrate.py"
        ) from err


def thresholds_for(
    thresholds: dict[str, Any] | None,
    cls: str | None,
    image: float | None = None,
    pixel: float | None = None,
) -> tuple[float, float, str]:
    """``(image threshold, pixel threshold, where they come from)`` for an image of class ``cls``.

    ``image`` / ``pixel`` override the calibrated values. A class the thresholds do not hold (or
    hold as null) uses the overall values, and the returned text says so; nan where nothing is known.
    """
    overall = (thresholds or {}).get("overall") or {}
    known = ((thresholds or {}).get("classes") or {}).get(cls) if cls else None
    if thresholds is None:
        where = "no thresholds"
    elif known:
        where = f"class {cls}"
    elif cls:
        where = f"overall (class {cls} not calibrated)"
    else:
        where = "overall (no class given)"
    parts = []
    values = []
    for kind, given in (("image", image), ("pixel", pixel)):
        if given is not None:
            values.append(float(given))
            parts.append(f"{kind} given")
            continue
        value = (known or {}).get(kind)
        if value is None and known is not None and overall.get(kind) is not None:
            parts.append(f"{kind} overall (class {cls} has none)")
            value = overall.get(kind)
        elif value is None:
            value = overall.get(kind)
        values.append(float("nan") if value is None else float(value))
    text = where if not parts else f"{where}; {', '.join(parts)}"
    return values[0], values[1], text


def decide(
    maps: np.ndarray | Sequence[np.ndarray],
    scores: np.ndarray,
    thresholds: dict[str, Any] | None,
    classes: Sequence[str | None] | str | None = None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> Decision:
    """Label (``score >= image threshold``) and mask (``map >= pixel threshold``) per image.

    ``maps``: ``[N, H, W]`` or a list of maps of any sizes (then ``masks`` is a list too);
    ``classes``: one class name for all, or one per image (None: the overall thresholds). Where no
    threshold is known the label is False and the mask empty (the source says ``no thresholds``).
    """
    n = len(scores)
    if classes is None or isinstance(classes, str):
        classes = [classes] * n
    if len(classes) != n:
        raise ValueError(f"classes has {len(classes)} entries for {n} images")
    chosen = [thresholds_for(thresholds, c, image_threshold, pixel_threshold) for c in classes]
    img_t = np.array([c[0] for c in chosen], np.float64)
    pix_t = np.array([c[1] for c in chosen], np.float64)
    with np.errstate(invalid="ignore"):
        labels = np.asarray(scores, np.float64) >= img_t
        masks = [np.asarray(m) >= t for m, t in zip(maps, pix_t, strict=True)]
    stacked = np.stack(masks) if isinstance(maps, np.ndarray) else masks
    return Decision(labels, stacked, img_t, pix_t, [c[2] for c in chosen])


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 map resized to ``size`` ``(H, W)`` with Pillow's bilinear filter: the way back from
    the model's input to the photo, which the data pipeline resized in with a plain bilinear resize
    (no crop), so the map covers the whole photo."""
    amap = np.asarray(amap, np.float32)
    if amap.shape == tuple(size):
        return amap
    resized = Image.fromarray(amap, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says, as the training data loader turns it
    (``data.pil_image.upright``; this module keeps its own copy to stay standalone)."""
    try:
        turned = im.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # a damaged EXIF block: the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if turned else im


def to_rgb(im: Image.Image, small_ints_are_8bit: bool = False) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, rescaled as the training data loader does
    (``data.pil_image.to_rgb``, of which this is the standalone copy)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif small_ints_are_8bit and peak <= 255:
            top = 255.0
        else:
            top = 65535.0 if peak <= 65535 else peak
        gray = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        factor = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        gray = np.clip(arr * factor + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return upright(im.copy())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image {path} does not exist") from err
    except Exception as err:  # Pillow reports damaged files with many exception types
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err})") from err


def read_image(image: ImageInput, size: tuple[int, int] | None) -> np.ndarray:
    """One input as uint8 RGB ``[H, W, 3]``, resized (Pillow bilinear) to ``size`` ``(H, W)`` unless None.

    Accepts a file path, a PIL image (any mode) or a uint8 array (``HxW``, ``HxWx3`` RGB or ``HxWx4``).
    """
    in_memory = not isinstance(image, (str, Path))
    if isinstance(image, (str, Path)):
        image = _open(Path(image))
    elif isinstance(image, np.ndarray):
        channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
        if image.dtype != np.uint8 or not channels_ok:
            raise ValueError(
                f"array images must be uint8 HxW, HxWx3 (RGB) or HxWx4, got {image.dtype} {image.shape}; "
                "convert floats with (x * 255).round().astype(np.uint8)"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot predict on {type(image).__name__}; pass paths, PIL images or uint8 arrays")
    image = to_rgb(upright(image), small_ints_are_8bit=in_memory)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ExportedModel:
    """An exported model and its input contract: uint8 RGB ``[B, H, W, 3]`` in, maps and scores out."""

    def __init__(
        self,
        path: Path,
        runner: Runner,
        image_size: tuple[int, int],
        batch: int | None,
        metadata: dict[str, Any] | None,
        engine: str,
    ) -> None:
        self.path = path
        self._runner = runner
        self.image_size = image_size
        self.batch = batch
        self.metadata = metadata
        self.engine = engine

    @property
    def thresholds(self) -> dict[str, Any] | None:
        """The calibrated thresholds the export carries (``model.json``), or None."""
        return (self.metadata or {}).get("thresholds")

    def __repr__(self) -> str:
        h, w = self.image_size
        batch = "dynamic" if self.batch is None else self.batch
        return f"ExportedModel({self.path}, {self.engine}, input uint8 [{batch}, {h}, {w}, 3])"

    def _size_text(self) -> str:
        h, w = self.image_size
        return f"{h}x{w} (HxW)"

    def run(self, images: np.ndarray) -> Prediction:
        """Run one batch ``uint8 [B, H, W, 3]`` (RGB, already at the model's size) as it is."""
        images = np.asarray(images)
        h, w = self.image_size
        if images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(
                f"the exported model {self.path.name} takes uint8 RGB images of {self._size_text()} as "
                f"[B, {h}, {w}, 3] (NHWC), got shape {list(images.shape)}; resize the images to {h}x{w} "
                "(predict() does so when resize=True)"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"the exported model takes uint8 images, got {images.dtype}")
        if self.batch is not None and images.shape[0] != self.batch:
            raise ValueError(
                f"the exported model {self.path.name} has a fixed batch of {self.batch}, "
                f"got {images.shape[0]} images"
            )
        maps, scores = self._runner(np.ascontiguousarray(images))
        return Prediction(np.asarray(maps, np.float32), np.asarray(scores, np.float32))

    def prepare(self, images: Sequence[ImageInput] | ImageInput, resize: bool = True) -> np.ndarray:
        """Inputs as one uint8 ``[N, H, W, 3]`` array; without ``resize`` a wrong size is an error."""
        if isinstance(images, (str, Path, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim <= 3
        ):
            images = [images]
        arrays = []
        for i, image in enumerate(images):
            rgb = read_image(image, self.image_size if resize else None)
            if rgb.shape[:2] != self.image_size:
                name = image if isinstance(image, (str, Path)) else f"image {i}"
                raise ValueError(
                    f"{name} is {rgb.shape[0]}x{rgb.shape[1]} but the exported model takes "
                    f"{self._size_text()}; pass resize=True or resize it to that size"
                )
            arrays.append(rgb)
        if not arrays:
            raise ValueError("predict needs at least one image")
        return np.stack(arrays)

    def predict(
        self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 8, resize: bool = True
    ) -> Prediction:
        """Maps ``[N, H, W]`` and scores ``[N]`` for paths, PIL images or uint8 arrays.

        Images are resized to the model's input size as in evaluation (``resize=False``: a
        different size is an error naming the model's size).
        """
        batch = self.prepare(images, resize)
        step = self.batch or max(1, int(batch_size))
        maps, scores = [], []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            real = len(chunk)
            if self.batch is not None and real < self.batch:  # fixed batch: repeat the last image
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - real, axis=0)])
            out = self.run(chunk)
            maps.append(out.maps[:real])
            scores.append(out.scores[:real])
        return Prediction(np.concatenate(maps), np.concatenate(scores))


def _read_metadata(model_path: Path) -> dict[str, Any] | None:
    path = model_path.parent / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _input_contract(shape: Sequence[Any], path: Path) -> tuple[tuple[int, int], int | None]:
    """``((H, W), batch or None)`` from the model's input shape ``[B, H, W, 3]``."""
    dims = list(shape)
    if len(dims) != 4 or dims[3] != 3 or not all(isinstance(d, int) and d > 0 for d in dims[1:3]):
        raise ModelFileError(f"{path} is not a MambaAD export: its input shape is {dims}, not [B, H, W, 3]")
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return (dims[1], dims[2]), batch


def _existing(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / f"model{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; export one with tools/export.py")
    return path


def load_onnx(
    path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None
) -> ExportedModel:
    """An exported ``model.onnx`` (or its folder) on onnxruntime (CPU unless ``providers`` say otherwise).

    ``threads``: intra-op threads (default: onnxruntime's, one per physical core). The scans run
    as thousands of small operators, each a barrier for the threads: on a machine whose cores
    are busy with other work, ``threads=1`` is faster (docs/deploy.md).
    """
    import onnxruntime as ort

    path = _existing(path, ".onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # decays that underflow into denormals slow x86 CPUs down by 10x or more; flush them to zero
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as err:  # onnxruntime reports bad files with several exception types
        raise _unloadable(path, "onnxruntime", err) from err
    inp = session.get_inputs()[0]
    size, batch = _input_contract(inp.shape, path)
    names = [o.name for o in session.get_outputs()]

    def runner(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run(names, {inp.name: images})
        return maps, scores

    return ExportedModel(path, runner, size, batch, _read_metadata(path), "onnxruntime")


def load_openvino(path: str | Path, device: str = "CPU", threads: int | None = None) -> ExportedModel:
    """An exported ``model.xml`` (OpenVINO IR; an ``.onnx`` file works too) compiled for ``device``."""
    import openvino as ov

    path = Path(path)
    if path.is_dir():
        path = path / "model.xml"
    path = _existing(path, path.suffix or ".xml")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as err:  # OpenVINO reports bad files as RuntimeError
        raise _unloadable(path, "OpenVINO", err) from err
    shape = model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape]
    size, batch = _input_contract(dims, path)
    # f32: no silent bf16 on CPUs that have it; LATENCY: one stream, all cores on one request
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(model, device, config)
    request = compiled.create_infer_request()
    by_name = {name: out for out in compiled.outputs for name in out.get_names()}
    map_out = by_name.get("anomaly_map", compiled.outputs[0])
    score_out = by_name.get("score", compiled.outputs[1])

    def runner(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({0: images})
        return np.array(result[map_out]), np.array(result[score_out])

    return ExportedModel(path, runner, size, batch, _read_metadata(path), "openvino")


def load_exported(path: str | Path, **kwargs: Any) -> ExportedModel:
    """``model.onnx`` -> onnxruntime, ``model.xml`` -> OpenVINO; a folder: whichever of the two it holds."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds neither model.onnx nor model.xml; export one with tools/export.py"
            )
        path = found[0]
    if path.suffix.lower() == ".xml":
        return load_openvino(path, **kwargs)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path, **kwargs)
    raise ModelFileError(f"{path}: expected an exported model.onnx or model.xml (see tools/export.py)")


def _peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    ``ru_maxrss`` survives ``exec``: a child started from a large parent reports at least the
    parent's size, whereas ``VmHWM`` belongs to the current program only.
    """
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _benchmark(model: ExportedModel, repeats: int) -> dict[str, Any]:
    """Median seconds of one ``run`` on a random batch (after a warm-up), wall and CPU time of
    this process (all its threads), and its peak RSS."""
    import statistics
    import time

    h, w = model.image_size
    images = np.random.default_rng(0).integers(0, 256, (model.batch or 1, h, w, 3), dtype=np.uint8)
    start = time.perf_counter()
    model.run(images)
    first = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(max(1, repeats)):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.run(images)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "engine": model.engine,
        "batch": len(images),
        "image_size": [h, w],
        "first_s": first,
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu),
        "repeats": len(times),
        "peak_rss_mib": _peak_rss_mib(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.runtime MODEL IMAGE...`` prints one score (and label, when ``model.json``
    holds thresholds or ``--threshold`` is given) per image; ``--benchmark N`` times it."""
    import argparse

    parser = argparse.ArgumentParser(description="Score images with an exported MambaAD model (no PyTorch).")
    parser.add_argument("model", help="model.onnx, model.xml or the export folder")
    parser.add_argument("images", nargs="*", help="image files")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--benchmark", type=int, metavar="N", help="time N runs on random input; print JSON")
    parser.add_argument("--class", dest="cls", default=None, help="class whose thresholds apply (model.json)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="image threshold (overrides model.json)"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors too")
    args = parser.parse_args(argv)
    if not args.images and not args.benchmark:
        parser.error("give image files to score, or --benchmark N")
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--batch-size and --threads must be at least 1")
    try:
        model = load_exported(args.model, threads=args.threads)
        if args.benchmark:
            print(json.dumps(_benchmark(model, args.benchmark)))
            return 0
        result = model.predict(args.images, batch_size=args.batch_size)
    except (OSError, ValueError, ImportError) as err:  # a missing or bad model or image file
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    decision = decide(result.maps, result.scores, model.thresholds, args.cls, args.threshold)
    for path, score, label, thr in zip(
        args.images, result.scores, decision.labels, decision.image_thresholds
    ):
        verdict = "" if np.isnan(thr) else ("\tanomalous" if label else "\tnormal")
        print(f"{path}\t{score:.6f}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
