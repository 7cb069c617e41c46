"""Calibrate a trained model's decision thresholds on a folder of labelled images.

    python tools/calibrate.py --checkpoint runs/RUN --input calib/
    python tools/calibrate.py --checkpoint runs/RUN --input calib/bottle --class bottle

``--input`` holds one folder per class, each laid out as an MVTec AD test folder:
``good/`` (normal images), one folder per defect type (anomalous images), and optionally
``ground_truth/<defect>/<stem>_mask.png`` masks (without masks, a class gets no pixel threshold
and uses the overall one); an MVTec class folder (``test/good``, ``test/<defect>``,
``ground_truth/``) works as it is. A folder that itself holds ``good/`` is one class (``--class``,
default its name). The image and pixel thresholds maximising F1 on these images, per class and
overall (:mod:`evaluation.thresholds`), are written to ``RUN/thresholds.json`` (``--output``
elsewhere), where ``tools/predict.py``, ``mambaad.load_model`` and ``tools/export.py`` find
them; later evaluations of the run leave this file alone and write ``thresholds_test.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.meta import IMAGE_EXTENSIONS
from evaluation import thresholds as th
from mambaad import Detector, load_model, predict
from util.cli import add_config_args, report_error
from util.errors import UsageError
from util.logger import get_logger
from util.progress import Progress

GOOD = "good"
MASKS = "ground_truth"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def labelled_images(root: Path, cls: str | None) -> dict[str, list[tuple[Path, Path | None, int]]]:
    """``{class: [(image, mask or None, label)]}`` of an MVTec-style folder (see the module doc)."""
    if not root.is_dir():
        raise UsageError(
            f"--input {root} is not a folder; pass a folder of classes with good/ and defect folders"
        )

    def is_class(d: Path) -> bool:
        return (d / GOOD).is_dir() or (d / "test" / GOOD).is_dir()

    class_dirs = (
        {cls or root.name: root}
        if is_class(root)
        else {d.name: d for d in sorted(root.iterdir()) if is_class(d)}
    )
    if not class_dirs:
        raise UsageError(
            f"--input {root} has no good/ folder, nor class folders holding one; lay it out as "
            "CLASS/good/*.png, CLASS/<defect>/*.png, optionally CLASS/ground_truth/<defect>/<stem>_mask.png"
        )
    found: dict[str, list[tuple[Path, Path | None, int]]] = {}
    for name, class_dir in class_dirs.items():
        folder = class_dir / "test" if (class_dir / "test" / GOOD).is_dir() else class_dir  # MVTec's layout
        items: list[tuple[Path, Path | None, int]] = [(p, None, 0) for p in _images(folder / GOOD)]
        for defect in sorted(d for d in folder.iterdir() if d.is_dir() and d.name not in (GOOD, MASKS)):
            for p in _images(defect):
                mask = class_dir / MASKS / defect.name / f"{p.stem}_mask.png"
                items.append((p, mask if mask.is_file() else None, 1))
        if not any(label for _, _, label in items) or all(label for _, _, label in items):
            raise UsageError(f"class {name} in --input {root} needs both normal (good/) and anomalous images")
        found[name] = items
    return found


def read_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """A mask as bool at ``size`` (H, W), resized as the data set resizes masks (bilinear, > 0.5)."""
    if path is None:
        return np.zeros(size, bool)
    with Image.open(path) as im:
        binary = np.asarray(im.convert("L")) > 127
    if binary.shape != size:
        soft = Image.fromarray(binary.astype(np.float32), mode="F").resize(
            (size[1], size[0]), Image.Resampling.BILINEAR
        )
        binary = np.asarray(soft) > 0.5
    return binary


def calibrate_folder(
    model: Detector,
    data: dict[str, list[tuple[Path, Path | None, int]]],
    batch_size: int,
    log: logging.Logger,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per class, one at a time: ``(class, scores, labels, maps, masks)`` of its labelled images, for
    :func:`evaluation.thresholds.calibrate` (maps and masks of images with a known mask only)."""
    size = model.image_size

    def classes() -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for cls, items in data.items():
            maps, scores = [], []
            for start in Progress(range(0, len(items), batch_size), f"calibrate {cls}", log.info):
                chunk = [p for p, _, _ in items[start : start + batch_size]]
                result = predict(model, chunk, batch_size=len(chunk))
                maps.append(result.maps)
                scores.append(result.scores)
            # anomalous images without a mask count for the image threshold only
            keep = [i for i, (_, m, label) in enumerate(items) if not label or m is not None]
            masks = np.stack([read_mask(items[i][1], size) for i in keep])
            labels = np.array([label for _, _, label in items])
            yield cls, np.concatenate(scores), labels, np.concatenate(maps)[keep], masks

    return classes()


def main(argv: list[str] | None = None) -> int:
    """Calibrate and write ``thresholds.json``; returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(
        parser, required=False, print_config=False, config_help="the run's config (default: its own)"
    )
    parser.add_argument("--checkpoint", required=True, help="a run folder or its net.pth / ckpt.pth")
    parser.add_argument("--input", required=True, type=Path, help="folder of labelled images (see above)")
    parser.add_argument("--class", dest="cls", default=None, help="class name when --input is one class")
    parser.add_argument(
        "--output", type=Path, default=None, help="thresholds file (default RUN/thresholds.json)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    log = get_logger()
    try:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        data = labelled_images(args.input, args.cls)
        model = load_model(args.checkpoint, config=args.config, overrides=args.overrides, log=log)
        source = Path(args.checkpoint)
        target = args.output or (source if source.is_dir() else source.parent) / th.THRESHOLDS_FILE
        items = calibrate_folder(model, data, args.batch_size, log)
        note = (
            f"calibrated on the labelled images of {args.input} ({sum(map(len, data.values()))} images), "
            "separate from the test split"
        )
        thresholds = th.calibrate(items, split=f"folder {args.input}", source="calibrate", note=note)
        th.save(thresholds, target)
    except FileNotFoundError as err:
        return report_error(UsageError(str(err)), args)
    except Exception as err:
        return report_error(err, args)
    overall = thresholds[th.OVERALL]
    log.info(
        "thresholds of %d class(es) written to %s (overall: image %.4g, pixel %s)",
        len(thresholds["classes"]),
        target,
        overall["image"],
        "n/a" if overall["pixel"] is None else f"{overall['pixel']:.4g}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
