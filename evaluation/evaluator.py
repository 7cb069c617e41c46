"""Streaming per-class evaluation: the seven metrics of spec section 4, lean enough for Real-IAD.

Batches are split by class as they arrive. Each class keeps its anomaly maps in ``map_dtype``
(float16 by default: 2 bytes a pixel) and its masks as packed bits (only for images that have
an anomaly). Once the maps held in RAM by all classes would exceed ``spill_mb``, the class that
receives data moves its maps to an append-only file under ``spill_dir`` (a temporary folder by
default) and is read back as a memory map. ``compute`` scores one class at a time, so the whole
test set is never concatenated and peak memory is about one class's maps in float32 plus the
in-RAM buffers. With a CUDA device (``device="auto"`` when CUDA is available) exact-mode metrics
run in torch on the GPU (:mod:`evaluation.metrics_torch`), one class's maps moved there at a time.
A metric that is undefined for a class (e.g. image AUROC without anomalous images) is logged as a
warning naming the class, the metric and why; ``ADEvaluator.undefined`` keeps the reasons for the
table's notes.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.metrics import METRIC_MODES, compute_metrics
from evaluation.metrics_exact import (
    METRIC_NAMES,
    SAMPLE_METRIC_NAMES,
    add_mad,
    average_over_classes,
    average_precision,
    f1_max,
    roc_auc,
)
from util.errors import make_folder

MODES = METRIC_MODES
MAP_DTYPES = ("float16", "float32")
_TRANSFER_MAPS = 256  # maps per host-to-device copy (bounds the host staging copy of memory maps)
_LOG = logging.getLogger("mambaad.evaluator")  # a child of the trainer's logger: reaches log.txt


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


class _ClassStore:
    """Everything one class needs for its metrics, appended batch by batch."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.shape: tuple[int, int] | None = None
        self.chunks: list[np.ndarray] = []  # maps held in RAM
        self.ram_bytes = 0
        self.file: Any = None  # open handle of the spill file, once spilled
        self.path: Path | None = None
        self.n = 0
        self.mask_bits: dict[int, np.ndarray] = {}  # packed masks of images with an anomaly
        self.labels: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.sample_ids: list[str] = []
        self.img_paths: list[str] = []

    def add_maps(self, maps: np.ndarray) -> None:
        if self.shape is None:
            self.shape = maps.shape[1:]
        elif maps.shape[1:] != self.shape:
            raise ValueError(
                f"anomaly maps of one class must share a size: got {maps.shape[1:]}, expected {self.shape}"
            )
        if self.file is not None:
            self.file.write(maps.tobytes())
        else:
            self.chunks.append(maps)
            self.ram_bytes += maps.nbytes
        self.n += len(maps)

    def spill(self, folder: Path) -> int:
        """Move the in-RAM maps to a file in ``folder``; returns the bytes freed."""
        self.path = Path(tempfile.mkstemp(suffix=".maps", dir=folder)[1])
        self.file = open(self.path, "wb")  # noqa: SIM115 - kept open while batches arrive
        for chunk in self.chunks:
            self.file.write(chunk.tobytes())
        freed, self.ram_bytes, self.chunks = self.ram_bytes, 0, []
        return freed

    def maps_on(self, device: torch.device) -> torch.Tensor:
        """All maps [N, H, W] in ``dtype`` on ``device``, copied a block of maps at a time."""
        maps = self.maps()
        out = torch.empty((self.n, *self.shape), dtype=getattr(torch, self.dtype.name), device=device)
        for start in range(0, self.n, _TRANSFER_MAPS):
            out[start : start + _TRANSFER_MAPS] = torch.from_numpy(
                np.array(maps[start : start + _TRANSFER_MAPS])
            )
        return out

    def maps(self) -> np.ndarray:
        """All maps [N, H, W] in ``dtype``: a memory map once spilled, else one array."""
        if self.file is not None:
            self.file.flush()
            return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, *self.shape))
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0]

    def mask_labels(self) -> np.ndarray:
        """Image labels from the masks (1 where the mask has a positive pixel), as [N] int64."""
        out = np.zeros(self.n, dtype=np.int64)
        out[list(self.mask_bits)] = 1
        return out

    def masks(self) -> np.ndarray:
        """All masks [N, H, W] as bool."""
        out = np.zeros((self.n, *self.shape), dtype=bool)
        size = self.shape[0] * self.shape[1]
        for i, bits in self.mask_bits.items():
            out[i] = np.unpackbits(bits, count=size).reshape(self.shape).view(bool)
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ADEvaluator:
    """Per-class metrics (fractions in [0, 1]) plus their mean over classes.

    mode: ``exact`` (every threshold, as scikit-learn / the MVTec AU-PRO definition), ``ader`` (the
    ADer benchmark's 50-bin ADEval pixel histograms and 21-threshold pixel F1-max; see
    :mod:`evaluation.metrics_ader`) or ``mambaad`` (the MambaAD paper's evaluator: image labels from the
    masks, 21-threshold pixel F1-max, 100-step AU-PRO; see :mod:`evaluation.metrics_mambaad`).
    map_dtype: ``float16`` or ``float32`` storage of the maps. spill_dir / spill_mb: where and
    beyond how many MB of maps in RAM (all classes together) maps move to disk; ``spill_mb=None``
    keeps everything in RAM. plots: write ROC / PR / PRO curves per class when ``compute`` gets an
    ``out_dir``. With ``sample_ids`` (multi-view data)
    the sample-level S-AUROC / S-AP / S-F1max are added (sample score and label = max over views).
    device: where exact-mode metrics run. ``cpu``: numpy (:mod:`evaluation.metrics`, the fastest on a
    CPU); a CUDA device such as ``cuda`` or ``cuda:1``: torch on that device
    (:mod:`evaluation.metrics_torch`, the same numbers to ~1e-12); ``auto``: ``cuda`` when available,
    else ``cpu``. Classes whose curves are needed (plots, vis), ``ader`` and ``mambaad`` use numpy.
    After ``compute``, ``undefined[cls][metric]`` says why a metric is nan (e.g. "has no anomalous
    test image").
    """

    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        mode: str = "exact",
        map_dtype: str = "float16",
        spill_dir: str | None = None,
        spill_mb: float | None = 512,
        plots: bool = False,
        device: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"evaluator.mode={mode!r} is not supported; use one of {', '.join(MODES)}")
        if map_dtype not in MAP_DTYPES:
            raise ValueError(f"evaluator.map_dtype={map_dtype!r} is not supported; use float16 or float32")
        self.metrics = tuple(metrics or METRIC_NAMES)
        self.mode = mode
        self.map_dtype = np.dtype(map_dtype)
        self.spill_dir = spill_dir
        self.spill_bytes = math.inf if spill_mb is None else float(spill_mb) * 2**20
        self.plots = plots
        self._torch_device = _metric_device(device)
        self._tmp: Path | None = None
        self._stores: dict[str, _ClassStore] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated sample (and delete spill files)."""
        self._close()
        self._stores = {}
        self._ram_bytes = 0
        self.num_samples = 0
        self.thresholds: dict[str, Any] | None = None
        self.undefined: dict[str, dict[str, str]] = {}

    def _close(self) -> None:
        for store in getattr(self, "_stores", {}).values():
            store.close()
        if getattr(self, "_tmp", None) is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self) -> None:
        self._close()

    def _spill_folder(self) -> Path:
        if self._tmp is None:
            if self.spill_dir is not None:
                make_folder(self.spill_dir, "evaluator.spill_dir")
            self._tmp = Path(tempfile.mkdtemp(prefix="mambaad_eval_", dir=self.spill_dir))
        return self._tmp

    def update(
        self,
        maps: torch.Tensor,
        scores: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        cls_names: Sequence[str],
        sample_ids: Sequence[str] | None = None,
        img_paths: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: maps [B,H,W], scores [B], masks [B,(1,)H,W], labels [B], class names.

        sample_ids (multi-view data) enable sample-level metrics; img_paths enable ``vis``.
        """
        maps_np = _numpy(maps)
        if maps_np.ndim == 4 and maps_np.shape[1] == 1:
            maps_np = maps_np[:, 0]
        if maps_np.ndim != 3:
            raise ValueError(f"maps must have shape [B, H, W], got {tuple(maps_np.shape)}")
        with np.errstate(over="ignore"):  # overflow is detected and explained just below
            stored = maps_np.astype(self.map_dtype)
        if not np.isfinite(stored).all():
            hint = (
                " (values beyond float16 range: set evaluator.map_dtype=float32)"
                if np.isfinite(maps_np).all()
                else ""
            )
            raise ValueError(f"anomaly maps contain inf/NaN{hint}")
        masks_np = _numpy(masks).reshape(maps_np.shape) > 0.5
        labels_np = _numpy(labels).astype(np.int64).reshape(-1)
        scores_np = _numpy(scores).astype(np.float64).reshape(-1)
        names = list(cls_names)
        for what, seq in (
            ("scores", scores_np),
            ("labels", labels_np),
            ("sample_ids", sample_ids),
            ("img_paths", img_paths),
        ):
            if seq is not None and len(seq) != len(names):
                raise ValueError(f"{what} has {len(seq)} entries for a batch of {len(names)} maps")
        for cls in dict.fromkeys(names):
            sel = np.array([c == cls for c in names])
            idx = np.flatnonzero(sel)
            store = self._stores.get(cls)
            if store is None:
                store = self._stores[cls] = _ClassStore(self.map_dtype)
            part = stored[sel]
            if store.file is None and self._ram_bytes + part.nbytes > self.spill_bytes:
                self._ram_bytes -= store.spill(self._spill_folder())
            first = store.n
            store.add_maps(part)
            if store.file is None:
                self._ram_bytes += part.nbytes
            for j, i in enumerate(idx):
                if masks_np[i].any():
                    store.mask_bits[first + j] = np.packbits(masks_np[i])
            store.labels.append(labels_np[sel])
            store.scores.append(scores_np[sel])
            if sample_ids is not None:
                store.sample_ids.extend(str(sample_ids[i]) for i in idx)
            if img_paths is not None:
                store.img_paths.extend(str(img_paths[i]) for i in idx)
        self.num_samples += len(names)

    def _class_metrics(self, cls: str, store: _ClassStore, curves: dict[str, Any] | None) -> dict[str, float]:
        labels = np.concatenate(store.labels)
        scores = np.concatenate(store.scores)
        maps, masks = store.maps(), store.masks()
        if self.mode == "mambaad":
            _warn_label_mismatch(cls, labels, store.mask_labels())
        device = self._torch_device if self.mode == "exact" and curves is None else None
        row = None
        if device is not None:
            try:
                row = compute_metrics(
                    store.maps_on(device), masks, labels, metrics=self.metrics, scores=scores, device=device
                )
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                _LOG.warning(
                    "class %s: %d maps of %s do not fit in the memory of %s; computing its metrics "
                    "with numpy on the CPU instead (same values, slower). evaluator.device=cpu skips the try",
                    cls,
                    store.n,
                    "x".join(map(str, store.shape)),
                    device,
                )
        if row is None:
            row = compute_metrics(
                maps, masks, labels, metrics=self.metrics, scores=scores, curves=curves, mode=self.mode
            )
        if len(store.sample_ids) == store.n:
            row.update(sample_metrics(scores, labels, store.sample_ids))
        return row

    def compute(
        self,
        out_dir: str | Path | None = None,
        read_image: Callable[[str, tuple[int, int]], np.ndarray] | None = None,
    ) -> dict[str, dict[str, float]]:
        """``{class: {metric: value, ..., "mAD": value}}`` per class seen, plus a ``"mean"`` entry.

        With ``out_dir``: curve plots under ``out_dir/curves/`` when built with ``plots=True``, and
        with ``read_image`` (``(path, (H, W)) -> RGB uint8``, the data set's reader; ``img_paths``
        given to ``update``) a grid of the worst and best cases per class under ``out_dir/vis/``.
        With ``out_dir`` also ``thresholds.json`` (F1-maximising thresholds, kept in ``thresholds``)
        and ``report.html`` (:mod:`evaluation.evaluation_report`).
        """
        if not self._stores:
            raise RuntimeError("the evaluator received no test samples")
        draw_curves = self.plots and out_dir is not None
        draw_vis = read_image is not None and out_dir is not None
        per_class: dict[str, dict[str, float]] = {}
        self.undefined = {}
        for cls in sorted(self._stores):
            store = self._stores[cls]
            curves: dict[str, Any] | None = {} if draw_curves or draw_vis else None
            per_class[cls] = add_mad(self._class_metrics(cls, store, curves))
            self._explain_undefined(cls, store, per_class[cls])
            if draw_curves:
                from evaluation.plots import save_curves

                save_curves(curves, cls, per_class[cls], Path(out_dir) / "curves")
            if draw_vis and len(store.img_paths) == store.n:
                from evaluation.plots import safe_name
                from evaluation.visualize import save_case_grid

                save_case_grid(
                    cls,
                    store.maps(),
                    store.masks(),
                    np.concatenate(store.labels),
                    np.concatenate(store.scores),
                    lambda i, paths=store.img_paths, size=store.shape: read_image(paths[i], tuple(size)),
                    curves.get("pixel_threshold", math.nan),
                    Path(out_dir) / "vis" / f"{safe_name(cls)}.png",
                )
        results = {**per_class, "mean": average_over_classes(per_class)}
        if out_dir is not None:  # thresholds.json and report.html (evaluation.evaluation_report)
            from evaluation.evaluation_report import write_evaluation_outputs

            self.thresholds = write_evaluation_outputs(self._stores, results, out_dir, read_image)
        return results

    def _explain_undefined(self, cls: str, store: _ClassStore, row: dict[str, float]) -> None:
        """Record in ``undefined`` and log, per reason, the class's metrics that are nan."""
        missing = [m for m in (*METRIC_NAMES, *SAMPLE_METRIC_NAMES) if m in row and math.isnan(row[m])]
        if not missing:
            return
        labels = store.mask_labels() if self.mode == "mambaad" else np.concatenate(store.labels)
        maps = store.maps()
        n_pos_px = sum(int(np.unpackbits(bits).sum()) for bits in store.mask_bits.values())
        counts = {
            "anomalous test image": int(labels.sum()),
            "normal test image": int(len(labels) - labels.sum()),
            "anomalous pixel": n_pos_px,
            "normal pixel": maps.size - n_pos_px,
        }
        if len(store.sample_ids) == store.n:
            sample_labels: dict[str, int] = {}
            for sample, label in zip(store.sample_ids, np.concatenate(store.labels), strict=True):
                sample_labels[sample] = max(sample_labels.get(sample, 0), int(label))
            counts["anomalous sample"] = sum(sample_labels.values())
            counts["normal sample"] = len(sample_labels) - counts["anomalous sample"]
        constant = self.mode != "exact" and float(np.min(maps)) == float(np.max(maps))
        reasons = {m: _undefined_reason(m, counts, constant) for m in missing}
        self.undefined[cls] = reasons
        for reason in dict.fromkeys(reasons.values()):
            names = [m for m, r in reasons.items() if r == reason]
            _LOG.warning(
                "class %s: %s undefined (%s %s); reported as n/a (null in metrics.json) and left out "
                "of the mean over classes",
                cls,
                ", ".join(names),
                cls,
                reason,
            )


def _undefined_reason(metric: str, counts: dict[str, int], constant_maps: bool) -> str:
    """Why ``metric`` is nan for a class with these counts, as a phrase after the class name."""
    needs_both = metric in ("I-AUROC", "P-AUROC", "AUPRO", "S-AUROC")
    unit = {"I": "test image", "P": "pixel", "A": "pixel", "S": "sample"}[metric[0]]
    if not counts.get(f"anomalous {unit}", 1):
        return f"has no anomalous {unit}"
    if needs_both and not counts.get(f"normal {unit}", 1):
        return f"has no normal {unit}"
    if constant_maps and unit == "pixel":
        return "has constant anomaly maps"
    return "gives no defined value"


def _warn_label_mismatch(cls: str, labels: np.ndarray, from_masks: np.ndarray) -> None:
    """Warn where the data set's image labels differ from the mask-derived ones mambaad mode uses."""
    empty = int(np.count_nonzero((labels > 0) & (from_masks == 0)))
    unlabelled = int(np.count_nonzero((labels == 0) & (from_masks > 0)))
    if empty or unlabelled:
        _LOG.warning(
            "class %s: %d image(s) labelled anomalous have an empty mask and %d labelled normal have "
            "mask pixels; evaluator.mode=mambaad takes the label from the mask, as the MambaAD "
            "authors' evaluator did",
            cls,
            empty,
            unlabelled,
        )


def _metric_device(device: str) -> torch.device | None:
    """The torch device for exact metrics, or None for the numpy path (see ``ADEvaluator``)."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"evaluator.device={device!r} is not a device; use auto, cpu or cuda[:N]") from err
    if parsed.type == "cpu":
        return None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"evaluator.device={device!r} but CUDA is not available; use auto or cpu")
    return parsed


def sample_metrics(scores: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str]) -> dict[str, float]:
    """S-AUROC / S-AP / S-F1max: each sample's score and label are the max over its views."""
    uniq, inverse = np.unique(np.asarray(sample_ids), return_inverse=True)
    s_scores = np.full(len(uniq), -np.inf)
    s_labels = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(s_scores, inverse, scores)
    np.maximum.at(s_labels, inverse, labels)
    return {
        "S-AUROC": roc_auc(s_scores, s_labels),
        "S-AP": average_precision(s_scores, s_labels),
        "S-F1max": f1_max(s_scores, s_labels),
    }
