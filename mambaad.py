"""Python API for notebooks and scripts: load a trained MambaAD model, score images.

    from mambaad import load_model, predict
    model = load_model("runs/mambaad_mvtec_20261125-101500")      # a run folder, or a .pth file
    result = predict(model, ["a.png", pil_image, uint8_array])    # paths, PIL images, HxWx3 arrays
    result.scores    # [N] image scores (max of each map)
    result.maps      # [N, H, W] float32 anomaly maps at the model's input size (blurred)
    result.labels    # [N] bool, True = anomalous: score >= the run's calibrated image threshold
    result.masks     # [N, H, W] bool: map >= the calibrated pixel threshold
    predict(model, images, size="image")   # maps and masks as lists, each at its photo's size

Thresholds come from the run folder's ``thresholds.json`` (written by every evaluation, or by
``tools/calibrate.py``) or an export's ``model.json``; ``classes=`` picks a class's values (an
unknown class uses the overall ones; ``result.sources`` says which), ``threshold=`` and
``pixel_threshold=`` override them.

``tools/predict.py`` is the command-line front end of the same functions. Images are
prepared exactly as in evaluation (RGB, bilinear resize to ``data.image_size``, ImageNet
normalisation), so a file scores the same here, in ``tools/predict.py`` and in ``-m test``.

``load_model("export/model.onnx")`` (or ``model.xml``, or an export folder) loads a model
exported by ``tools/export.py`` on onnxruntime / OpenVINO instead; PyTorch is imported only
when a PyTorch model is loaded, so that path runs where torch is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from data import as_hw
from util.config import BaseConfig
from util.run_config import load_run_config

if TYPE_CHECKING:
    import torch

    from deploy.runtime import ExportedModel

ImageInput = str | Path | Image.Image | np.ndarray

__all__ = ["Detector", "Prediction", "config_from_run", "load_model", "predict", "prepare_image"]


@dataclass
class Prediction:
    """Scores ``[N]`` and anomaly maps ``[N, H, W]`` (float32, at the model's input size), with the
    decisions: ``labels [N]`` (True = anomalous) and ``masks`` (bool, as ``maps``), the thresholds
    used per image and where each came from (``sources``). With ``size="image"``, ``maps`` and
    ``masks`` are lists of arrays at each photo's own size."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None = None
    masks: np.ndarray | list[np.ndarray] | None = None
    image_thresholds: np.ndarray | None = None
    pixel_thresholds: np.ndarray | None = None
    sources: list[str] | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Detector:
    """A loaded model with the config it was built from, ready for :func:`predict`."""

    net: torch.nn.Module
    cfg: BaseConfig
    device: torch.device
    thresholds: dict[str, Any] | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """Input size ``(H, W)`` the images are resized to."""
        return as_hw(self.cfg.data.image_size)

    def predict(
        self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 8, **kwargs: Any
    ) -> Prediction:
        """Same as :func:`predict` ``(self, images, batch_size, ...)``."""
        return predict(self, images, batch_size, **kwargs)


def config_from_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> BaseConfig:
    """The config a run used, rebuilt from ``run_dir/config.json`` as data; ``overrides`` apply on top.

    No file named by the folder is executed (see :mod:`util.run_config`): the values are restored
    over this project's own config class. Pass ``config=`` to :func:`load_model` to use a config
    file of your own instead.
    """
    if not (Path(run_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"{Path(run_dir) / 'config.json'} does not exist; pass a run folder written by run.py, "
            "or config=CONFIG_FILE for a bare checkpoint"
        )
    return load_run_config(run_dir, overrides)


def load_model(
    checkpoint_or_run_dir: str | Path,
    config: str | Path | BaseConfig | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
    log: logging.Logger | None = None,
) -> Detector | ExportedModel:
    """Load weights (our ``net.pth``/``ckpt.pth`` or the authors' official files) for prediction.

    ``checkpoint_or_run_dir``: a run folder (its ``net.pth``, else ``ckpt.pth``, and its
    ``config.json``) or a checkpoint file. ``config``: a config file (Python, executed: pass only
    files you trust) or object; by default the run's ``config.json``, read as data without running
    any code (also for a file inside a run folder), else the paper model (``configs/defaults.py``,
    as for official checkpoints). ``overrides``: ``key=value`` strings. Checkpoints are read with
    ``weights_only=True`` (:func:`util.checkpoint.load_file`). An exported ``model.onnx`` /
    ``model.xml`` (or a folder with ``model.json``) gives a :class:`deploy.runtime.ExportedModel`
    instead, loaded without importing PyTorch.
    """
    source = Path(checkpoint_or_run_dir)
    if source.suffix.lower() in (".onnx", ".xml") or (source / "model.json").is_file():
        from deploy.runtime import load_exported  # an exported model: onnxruntime / OpenVINO

        return load_exported(source)
    from deploy.runtime import read_thresholds
    from model.loading import load_network  # PyTorch: only for a PyTorch model

    net, cfg, dev = load_network(source, config, device, overrides, log)
    return Detector(net=net, cfg=cfg, device=dev, thresholds=read_thresholds(source))


def prepare_image(image: ImageInput, size: tuple[int, int]) -> torch.Tensor:
    """One input as the model sees it: float32 ``[3, H, W]``, resized and ImageNet-normalised.

    Accepts a file path, a PIL image (any mode) or a uint8 array (``HxW``, ``HxWx3`` RGB or
    ``HxWx4`` RGBA); a path gives exactly what evaluation uses (``data.default_ad.load_image``).
    """
    from data.default_ad import image_to_tensor, load_image

    if isinstance(image, (str, Path)):
        return load_image(image, size)
    if isinstance(image, np.ndarray):
        channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
        if image.dtype != np.uint8 or not channels_ok:
            raise ValueError(
                f"array images must be uint8 HxW, HxWx3 (RGB) or HxWx4, got {image.dtype} {image.shape}; "
                "convert floats with (x * 255).round().astype(np.uint8)"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot predict on {type(image).__name__}; pass paths, PIL images or uint8 arrays")
    if 0 in image.size:
        raise ValueError(f"cannot predict on an empty image ({image.size[0]}x{image.size[1]} pixels)")
    return image_to_tensor(image, size)


def predict_batch(model: Detector, images: Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps ``[B, H, W]`` and scores ``[B]`` (tensors on the model's device) for one batch."""
    import torch

    if not isinstance(model, Detector):  # an exported model (deploy.runtime)
        out = model.predict(list(images), batch_size=max(1, len(images)))
        return torch.from_numpy(out.maps), torch.from_numpy(out.scores)
    size = model.image_size
    with torch.no_grad():
        imgs = torch.stack([prepare_image(im, size) for im in images]).to(model.device)
        return model.net.predict(imgs, size)


def predict(
    model: Detector | ExportedModel,
    images: Sequence[ImageInput] | ImageInput,
    batch_size: int = 8,
    classes: Sequence[str | None] | str | None = None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    size: str = "model",
) -> Prediction:
    """Anomaly scores, maps, labels and masks for a list of images (paths, PIL images or uint8 arrays).

    ``model``: a :class:`Detector`, or an exported model from :func:`load_model` (runs without
    PyTorch). ``classes``: the class of every image (one name, or one per image) whose calibrated
    thresholds apply; ``threshold`` / ``pixel_threshold`` override them. ``size``: ``"model"``
    (maps and masks ``[N, H, W]`` at the model's input size) or ``"image"`` (lists, each map
    resized back to its photo's size, bilinear, as the photo was resized in; masks from those maps).
    """
    from deploy.runtime import decide, read_image, resize_map

    if size not in ("model", "image"):
        raise ValueError(f"size must be 'model' or 'image', got {size!r}")
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    if not isinstance(images, Iterable) or isinstance(images, bytes):
        raise TypeError(
            f"predict takes an image or a list of images (paths, PIL images, uint8 arrays), "
            f"got {type(images).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number of images, got {batch_size!r}")
    images = list(images)
    if not images:
        raise ValueError("predict needs at least one image")
    if not isinstance(model, Detector):  # an exported model (deploy.runtime)
        out = model.predict(images, batch_size=batch_size)
        scores, maps = out.scores, out.maps
    else:
        map_parts, score_parts = [], []
        for start in range(0, len(images), batch_size):
            batch_maps, batch_scores = predict_batch(model, images[start : start + batch_size])
            map_parts.append(batch_maps.float().cpu().numpy())
            score_parts.append(batch_scores.float().cpu().numpy())
        scores, maps = np.concatenate(score_parts), np.concatenate(map_parts).astype(np.float32)
    if size == "image":
        maps = [resize_map(m, read_image(im, None).shape[:2]) for m, im in zip(maps, images, strict=True)]
    decision = decide(maps, scores, model.thresholds, classes, threshold, pixel_threshold)
    return Prediction(
        scores=scores,
        maps=maps,
        labels=decision.labels,
        masks=decision.masks,
        image_thresholds=decision.image_thresholds,
        pixel_thresholds=decision.pixel_thresholds,
        sources=decision.sources,
    )
