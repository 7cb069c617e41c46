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

Two optional per-image fields come with a batch. ``groups`` (MVTec LOCO AD: ``logical`` /
``structural`` for an anomalous image, ``""`` for a normal one) adds a row ``<class>/<group>`` per
group, scored on the class's normal images and that group's anomalous ones, and ``mean/<group>``;
the plain ``mean`` stays over the classes. ``splits`` marks held-out validation images
(``"validation"``, MVTec AD 2): their maps and scores are kept apart, never in a metric of the test
set, for metrics that choose a threshold on validation data (:meth:`ADEvaluator.validation_maps`).
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
from evaluation.metrics_extra import EXTRA_METRICS, SEGF1_THRESHOLDS, compute_extra_metrics
from evaluation.protocol import IMAGE_SCORES, image_scores, resize_maps, resize_masks, smooth_maps
from evaluation.report import GROUP_SEP
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
        self.groups: list[str] = []

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

    The protocol switches (docs/metrics.md): ``image_score`` (``model``: the method's own score;
    ``max``; ``topk_mean`` of the top ``image_score_k`` %; ``pooled_max`` after an
    ``image_score_pool`` average filter), ``mask_threshold`` (masks ``> t``, after the resize to
    ``resolution``), ``smooth_sigma`` / ``smooth_taps`` (a Gaussian blur added to the method's maps),
    ``resolution`` (maps and masks resized to this size, None: as predicted), ``aupro_limit`` and
    ``aupro_steps`` (see :func:`evaluation.metrics.compute_metrics`). ``metrics`` may add
    ``P-mIoU-max``, ``AUPIMO`` and ``SegF1`` (:mod:`evaluation.metrics_extra`; ``segf1_threshold``).
    ``also_exact``: in ``ader`` / ``mambaad`` mode also compute the exact table
    (``exact_results`` after ``compute``).
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
        image_score: str = "model",
        image_score_k: float = 1.0,
        image_score_pool: int = 16,
        mask_threshold: float = 0.5,
        smooth_sigma: float | None = None,
        smooth_taps: int | None = None,
        resolution: int | Sequence[int] | None = None,
        aupro_limit: float = 0.3,
        aupro_steps: int | None = None,
        segf1_threshold: float | str = "normal_test",
        also_exact: bool = True,
    ) -> None:
        for key, value, choices in (
            ("mode", mode, MODES),
            ("map_dtype", map_dtype, MAP_DTYPES),
            ("image_score", image_score, IMAGE_SCORES),
        ):
            if value not in choices:
                raise ValueError(f"evaluator.{key}={value!r} does not exist; use one of {', '.join(choices)}")
        unknown = [m for m in metrics or () if m not in (*METRIC_NAMES, *EXTRA_METRICS)]
        if unknown:
            raise ValueError(
                f"evaluator.metrics: unknown {', '.join(map(repr, unknown))}; "
                f"use some of {', '.join((*METRIC_NAMES, *EXTRA_METRICS))}"
            )
        if aupro_steps is not None and mode != "mambaad":
            raise ValueError(f"evaluator.aupro_steps={aupro_steps} applies to evaluator.mode=mambaad only")
        if isinstance(segf1_threshold, str) and segf1_threshold not in SEGF1_THRESHOLDS:
            raise ValueError(
                f"evaluator.segf1_threshold={segf1_threshold!r} does not exist; "
                f"use a number or {', '.join(SEGF1_THRESHOLDS)}"
            )
        chosen = tuple(metrics or METRIC_NAMES)
        self.metrics = tuple(m for m in chosen if m in METRIC_NAMES)
        self.extra_metrics = tuple(m for m in chosen if m in EXTRA_METRICS)
        self.image_score = (image_score, float(image_score_k), int(image_score_pool))
        self.mask_threshold = float(mask_threshold)
        self.smoothing = None if smooth_sigma is None else (float(smooth_sigma), smooth_taps)
        self.resolution = (
            None
            if resolution is None
            else tuple(resolution)
            if isinstance(resolution, list | tuple)
            else (resolution,) * 2
        )
        self.aupro = {"aupro_limit": float(aupro_limit), "aupro_steps": aupro_steps}
        self.segf1_threshold = segf1_threshold
        self.also_exact = bool(also_exact) and mode != "exact"
        self.mode = mode
        self.map_dtype = np.dtype(map_dtype)
        self.spill_dir = spill_dir
        self.spill_bytes = math.inf if spill_mb is None else float(spill_mb) * 2**20
        self.plots = plots
        self._torch_device = _metric_device(device)
        self._tmp: Path | None = None
        self._stores: dict[str, _ClassStore] = {}
        self._validation: dict[str, _ClassStore] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated sample (and delete spill files)."""
        self._close()
        self._stores = {}
        self._validation = {}
        self._ram_bytes = 0
        self.num_samples = 0
        self.thresholds: dict[str, Any] | None = None
        self.undefined: dict[str, dict[str, str]] = {}
        self.exact_results: dict[str, dict[str, float]] | None = None

    def _close(self) -> None:
        for store in [*getattr(self, "_stores", {}).values(), *getattr(self, "_validation", {}).values()]:
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
        groups: Sequence[str] | None = None,
        splits: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: maps [B,H,W], scores [B], masks [B,(1,)H,W], labels [B], class names.

        sample_ids (multi-view data) enable sample-level metrics; img_paths enable ``vis``; groups
        add per-group rows; images whose ``splits`` entry is ``"validation"`` are held apart.
        """
        maps, scores, masks = self._apply_protocol(maps, scores, masks)
        if splits is not None:
            if len(splits) != len(cls_names):
                raise ValueError(f"splits has {len(splits)} entries for a batch of {len(cls_names)} maps")
            held = np.array([str(s) == "validation" for s in splits], dtype=bool)
            if held.any():
                self._hold_validation(_numpy(maps)[held], _numpy(scores).reshape(-1)[held], cls_names, held)
                keep = np.flatnonzero(~held)
                if not len(keep):
                    return
                pick = [list(cls_names), sample_ids, img_paths, groups]
                cls_names, sample_ids, img_paths, groups = (
                    None if seq is None else [seq[i] for i in keep] for seq in pick
                )
                maps, scores, masks, labels = (_numpy(x)[keep] for x in (maps, scores, masks, labels))
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
        masks_np = _numpy(masks).reshape(maps_np.shape) > self.mask_threshold
        labels_np = _numpy(labels).astype(np.int64).reshape(-1)
        scores_np = _numpy(scores).astype(np.float64).reshape(-1)
        names = list(cls_names)
        for what, seq in (
            ("scores", scores_np),
            ("labels", labels_np),
            ("sample_ids", sample_ids),
            ("img_paths", img_paths),
            ("groups", groups),
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
            if groups is not None:
                store.groups.extend(str(groups[i]) for i in idx)
        self.num_samples += len(names)

    def _hold_validation(
        self, maps: np.ndarray, scores: np.ndarray, cls_names: Sequence[str], held: np.ndarray
    ) -> None:
        """Keep the held-out validation images' maps [N, H, W] and scores [N] per class (RAM only:
        validation sets are small)."""
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        names = [c for c, h in zip(cls_names, held, strict=True) if h]
        for cls in dict.fromkeys(names):
            sel = np.array([c == cls for c in names])
            store = self._validation.setdefault(cls, _ClassStore(self.map_dtype))
            store.add_maps(maps[sel].astype(self.map_dtype))
            store.scores.append(scores[sel].astype(np.float64))
            store.labels.append(np.zeros(int(sel.sum()), dtype=np.int64))

    def validation_maps(self, cls: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The held-out validation images of ``cls`` received since ``reset``: (maps [N, H, W] in the
        storage dtype, scores [N]), or None when there were none (all are normal images)."""
        store = self._validation.get(cls)
        if store is None or store.n == 0:
            return None
        return store.maps(), np.concatenate(store.scores)

    @property
    def validation_classes(self) -> list[str]:
        """Classes with held-out validation images, sorted."""
        return sorted(c for c, store in self._validation.items() if store.n)

    def _apply_protocol(self, maps: Any, scores: Any, masks: Any) -> tuple[Any, Any, Any]:
        """Smoothing, resolution, mask binarisation and image score of a batch, where they differ
        from the method's own (the defaults leave the batch untouched)."""
        kind, top_percent, pool = self.image_score
        if self.smoothing is None and self.resolution is None and kind == "model":
            return maps, scores, masks
        maps_t = torch.as_tensor(maps).detach().cpu().float()
        if maps_t.ndim == 4 and maps_t.shape[1] == 1:
            maps_t = maps_t[:, 0]
        if self.smoothing is not None:
            maps_t = smooth_maps(maps_t, *self.smoothing)
        if self.resolution is not None:
            maps_t = resize_maps(maps_t, self.resolution)
            masks_t = torch.as_tensor(masks).detach().cpu()
            masks = resize_masks(
                masks_t.reshape(len(masks_t), *masks_t.shape[-2:]), self.resolution, self.mask_threshold
            )
        if kind != "model":
            scores = image_scores(maps_t, kind, top_percent, pool)
        return maps_t, scores, masks

    def _class_metrics(
        self, cls: str, store: _ClassStore, curves: dict[str, Any] | None, mode: str | None = None
    ) -> dict[str, float]:
        mode = mode or self.mode
        labels = np.concatenate(store.labels)
        scores = np.concatenate(store.scores)
        maps, masks = store.maps(), store.masks()
        if mode == "mambaad":
            _warn_label_mismatch(cls, labels, store.mask_labels())
        aupro = self.aupro if mode == self.mode else {"aupro_limit": self.aupro["aupro_limit"]}
        device = self._torch_device if mode == "exact" and curves is None else None
        row = None
        if device is not None:
            try:
                row = compute_metrics(
                    store.maps_on(device),
                    masks,
                    labels,
                    metrics=self.metrics,
                    scores=scores,
                    device=device,
                    **aupro,
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
                maps, masks, labels, metrics=self.metrics, scores=scores, curves=curves, mode=mode, **aupro
            )
        if len(store.sample_ids) == store.n:
            row.update(sample_metrics(scores, labels, store.sample_ids))
        if self.extra_metrics and mode == self.mode:
            held = self.validation_maps(cls) if self.segf1_threshold == "validation" else None
            validation = None if held is None else held[0]
            extra = compute_extra_metrics(
                maps, masks, self.extra_metrics, self.segf1_threshold, validation=validation
            )
            row.update(extra)
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
        per_group: dict[str, dict[str, dict[str, float]]] = {}
        exact: dict[str, dict[str, float]] = {}
        self.undefined = {}
        for cls in sorted(self._stores):
            store = self._stores[cls]
            curves: dict[str, Any] | None = {} if draw_curves or draw_vis else None
            per_class[cls] = add_mad(self._class_metrics(cls, store, curves))
            if self.also_exact:
                exact[cls] = add_mad(self._class_metrics(cls, store, None, mode="exact"))
            self._explain_undefined(cls, store, per_class[cls])
            for group, row in self._group_metrics(store).items():
                per_group.setdefault(group, {})[f"{cls}{GROUP_SEP}{group}"] = row
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
        grouped = {name: row for rows in per_group.values() for name, row in rows.items()}
        means = {f"mean{GROUP_SEP}{g}": average_over_classes(rows) for g, rows in sorted(per_group.items())}
        self.exact_results = {**exact, "mean": average_over_classes(exact)} if exact else None
        results = {
            **per_class,
            "mean": average_over_classes(per_class),
            **dict(sorted(grouped.items())),
            **means,
        }
        if out_dir is not None:  # thresholds.json and report.html (evaluation.evaluation_report)
            from evaluation.evaluation_report import write_evaluation_outputs

            self.thresholds = write_evaluation_outputs(self._stores, results, out_dir, read_image)
        return results

    def _group_metrics(self, store: _ClassStore) -> dict[str, dict[str, float]]:
        """Per group of the class's images (``groups`` given to ``update``): the metrics over its
        normal images (no group) and the group's images, with mAD."""
        if len(store.groups) != store.n or not any(store.groups):
            return {}
        groups = np.asarray(store.groups)
        labels, scores = np.concatenate(store.labels), np.concatenate(store.scores)
        maps, masks = store.maps(), store.masks()
        rows = {}
        for group in sorted(set(store.groups) - {""}):
            idx = np.flatnonzero((groups == "") | (groups == group))
            rows[group] = add_mad(
                compute_metrics(
                    np.asarray(maps[idx]),
                    masks[idx],
                    labels[idx],
                    metrics=self.metrics,
                    scores=scores[idx],
                    mode=self.mode,
                )
            )
        return rows

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
