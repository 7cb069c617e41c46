"""Anomaly maps, decisions and a report for new images with a trained model.

    python tools/predict.py -c configs/mambaad_demo.py --checkpoint runs/RUN/net.pth \\
        --input path/to/images --output predictions/
    python tools/predict.py --checkpoint runs/RUN --input path/to/images --output predictions/

Without ``-c`` the config comes from the run folder's ``config.json`` (a run folder or a
file inside one), read as data without running any code, else the paper model (official
checkpoints). A ``-c`` config file is Python and runs: pass only files you trust. The model
code is the Python API's (``mambaad.load_model`` / ``mambaad.predict``). With ``--model``
(an exported ``model.onnx`` / ``model.xml``) PyTorch is not imported at all.

Each image gets a label and a mask from the run's ``thresholds.json`` (or the export's
``model.json``): the values of its class (``--class``, else its first folder below
``--input``), the overall values for a class not calibrated (its row says so);
``--threshold`` / ``--pixel-threshold`` override them. Written per image, at the photo's own
size (``--size model``: at the model's input size): ``<stem>.npy`` (float32 anomaly map, the
model's map resized back bilinearly, as the photo was resized in), ``<stem>.png`` (heat-map
overlay), ``masks/<stem>.png`` (the binary mask) and ``panels/<stem>.jpg`` (photo | heat map |
mask outline, with the colour bar), in the sub-folder the image has below ``--input``; images
whose stems clash in one folder (``a.png`` and ``a.jpg``) keep their extension (``a.png.npy``).
``scores.csv`` gets one row per image as it is finished (append-only): a rerun with the same
options skips the images it lists, so an interrupted run continues where it stopped. At the
end ``report.html`` (per-class summary, score curves, a gallery sorted by score, filterable by
class and decision) and ``README.txt`` (what the colours mean) are written. One colour scale
serves every image: ``--vmin/--vmax``, else the map range of the calibration, else the first
batch's range; it is kept in ``predict.json`` for reruns.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.meta import IMAGE_EXTENSIONS
from deploy.runtime import ExportedModel, ModelFileError, read_image, resize_map
from evaluation.html_report import REPORT_FILE, GalleryItem, line_chart, table_html, write_report
from evaluation.panels import SCALE_TEXT, overlay, panel
from mambaad import Detector, load_model, predict
from util.cli import add_config_args, report_error
from util.errors import UsageError, UserError, make_folder, write_failure
from util.logger import get_logger
from util.progress import Progress


def list_images(path: Path) -> list[Path]:
    """One image, or every image below a folder (sorted)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} does not exist; pass an image file or a folder of images")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--input {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def without_outputs(files: list[Path], root: Path, output: Path, log: logging.Logger) -> list[Path]:
    """``files`` (found below ``root``) without those below an ``output`` folder inside ``root``:
    they are the overlays of an earlier run, not inputs. (``output`` equal to ``root`` is refused
    later, by :func:`check_output`, since overlays would overwrite inputs.)"""
    out = output.resolve()
    if out == root.resolve():
        return files
    kept = [p for p in files if not p.resolve().is_relative_to(out)]
    if len(kept) < len(files):
        skipped = len(files) - len(kept)
        log.info("--output %s lies inside --input: its %d image(s) are not inputs", output, skipped)
    if not kept:
        raise FileNotFoundError(f"--input holds no images outside --output {output}")
    return kept


def relative_inputs(files: list[Path], root: Path) -> list[Path]:
    """Each input's path below ``root`` (for a single file ``root``, its name)."""
    return [Path(p.name) if root.is_file() else p.relative_to(root) for p in files]


def output_names(relative: list[Path]) -> list[Path]:
    """One distinct output base (relative, no extension) per input: sub-folder kept, then the stem.

    Inputs whose stem clashes with another's in the same folder (``a.png``, ``a.jpg``) keep their
    extension (``a.png``, ``a.jpg``). Names are compared case-insensitively (case-insensitive file
    systems), and any clash left (``a.png.jpg`` next to ``a.png`` and ``a.jpg``) gets ``~2``, ``~3``...
    """
    stems = [rel.parent / rel.stem for rel in relative]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.as_posix().lower()] = counts.get(stem.as_posix().lower(), 0) + 1
    bases = [rel if counts[stem.as_posix().lower()] > 1 else stem for rel, stem in zip(relative, stems)]
    taken: set[str] = set()
    unique = []
    for base in bases:
        name, n = base, 1
        while name.as_posix().lower() in taken:
            n += 1
            name = base.parent / f"{base.name}~{n}"
        taken.add(name.as_posix().lower())
        unique.append(name)
    return unique


def with_extension(base: Path, ext: str) -> Path:
    """``base`` + ``ext`` without replacing a dot already in the name (``a.png`` -> ``a.png.npy``)."""
    return base.parent / f"{base.name}{ext}"


def check_output(output: Path, inputs: list[Path], targets: list[Path]) -> None:
    """Refuse an ``--output`` that is a file, or outputs that would overwrite an input image."""
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(
            f"--output {output} is an existing file, not a folder; pass a folder (it is created if needed)"
        )
    sources = {p.resolve() for p in inputs}
    overwritten = [t for t in targets if t.resolve() in sources]
    if overwritten:
        raise FileExistsError(
            f"writing to --output {output} would overwrite the input image {overwritten[0]}; "
            "choose an output folder outside the input folder"
        )


COLUMNS = [
    "image",
    "class",
    "score",
    "label",
    "image_threshold",
    "pixel_threshold",
    "thresholds_from",
    "anomalous_pixels",
    "width",
    "height",
    "map",
    "overlay",
    "mask",
    "panel",
]
SETTINGS_FILE = "predict.json"
SIZES = {"image": "each photo's own size", "model": "the model's input size"}
LEGEND_FILE = "README.txt"


@dataclass
class Outputs:
    """The files of one input image, relative to ``--output``."""

    map: Path
    overlay: Path
    mask: Path
    panel: Path


def outputs_of(base: Path) -> Outputs:
    """Map and overlay beside each other, mask and panel in their own folders (no name can clash)."""
    return Outputs(
        with_extension(base, ".npy"),
        with_extension(base, ".png"),
        Path("masks") / with_extension(base, ".png"),
        Path("panels") / with_extension(base, ".jpg"),
    )


def image_class(rel: Path, given: str | None) -> str | None:
    """``--class``, else the image's first folder below ``--input`` (None for images at its top)."""
    if given:
        return given
    return rel.parts[0] if len(rel.parts) > 1 else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(
        parser,
        required=False,
        print_config=False,
        config_help="the config the model was trained with (default: the run's)",
        overrides_help="config overrides such as model.scan.backend=ref",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder, its net.pth / ckpt.pth, or an official file")
    source.add_argument("--model", help="an exported model.onnx / model.xml or its folder (tools/export.py)")
    parser.add_argument("--input", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument(
        "--output", required=True, type=Path, help="folder (created if needed) for maps, overlays, scores.csv"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vmin", type=float, default=None, help="heat-map colour scale minimum")
    parser.add_argument("--vmax", type=float, default=None, help="heat-map colour scale maximum")
    parser.add_argument(
        "--threshold", type=float, default=None, help="image threshold (overrides the calibrated)"
    )
    parser.add_argument(
        "--pixel-threshold", type=float, default=None, help="pixel threshold (overrides the calibrated)"
    )
    parser.add_argument(
        "--class",
        dest="cls",
        default=None,
        help="class of every image (default: its first folder below --input)",
    )
    parser.add_argument(
        "--size",
        choices=("image", "model"),
        default="image",
        help="outputs at each photo's own size (default) or at the model's input size",
    )
    args = parser.parse_args(argv)
    if args.model and (args.config or args.overrides):
        parser.error("--model takes an exported model; -c and config overrides apply to --checkpoint only")
    return args


def main(argv: list[str] | None = None) -> int:
    """Predict every input image; returns the process exit code."""
    args = parse_args(argv)
    log = get_logger()
    try:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.vmin is not None and args.vmax is not None and args.vmin >= args.vmax:
            raise UsageError(
                f"--vmin {args.vmin:g} must be below --vmax {args.vmax:g} (the colour scale runs from "
                f"--vmin, blue, to --vmax, red)"
            )
        files = without_outputs(list_images(args.input), args.input, args.output, log)
        relative = relative_inputs(files, args.input)
        outs = [outputs_of(b) for b in output_names(relative)]
        targets = [args.output / f for o in outs for f in (o.map, o.overlay, o.mask, o.panel)]
        check_output(args.output, files, targets)
        model = load_model(
            args.model or args.checkpoint, config=args.config, overrides=args.overrides, log=log
        )
    except (
        FileNotFoundError,
        NotADirectoryError,
        FileExistsError,
        ModelFileError,
    ) as err:  # a wrong path given
        return report_error(UsageError(str(err)), args)
    except Exception as err:
        return report_error(err, args)
    if isinstance(model, Detector):  # an exported model (--model) runs where its runtime runs
        from util.distributed import resolve_device

        device = resolve_device(model.cfg.device)
        model.net.to(device)
        model.device = device
    try:
        done, (vmin, vmax) = write_outputs(args, model, files, relative, outs)
    except KeyboardInterrupt:  # Ctrl-C: every image listed in scores.csv is complete
        listed = args.output / "scores.csv"
        rows = max(0, len(listed.read_text(encoding="utf-8").splitlines()) - 1) if listed.is_file() else 0
        log.warning(
            "interrupted: %d of %d image(s) finished and listed in %s; run the same command again to "
            "continue with the others",
            rows,
            len(files),
            args.output / "scores.csv",
        )
        return 130
    except Exception as err:  # e.g. an input that cannot be decoded (the message names it)
        return report_error(err, args)
    log.info(
        "%d image(s) predicted, %d already done by an earlier run; maps, overlays, masks, panels, "
        "scores.csv and report.html in %s (colour scale %.4g..%.4g)",
        len(files) - done,
        done,
        args.output,
        vmin,
        vmax,
    )
    return 0


def _settings(args: argparse.Namespace, model: Detector | ExportedModel) -> dict[str, Any]:
    """What fixes the outputs of a run of predict; a rerun into the same folder must match it."""
    return {
        "model": str(Path(args.model or args.checkpoint).resolve()),
        "size": args.size,
        "class": args.cls,
        "threshold": args.threshold,
        "pixel_threshold": args.pixel_threshold,
        "calibrated_thresholds": model.thresholds,
    }


def _finished(output: Path, settings: dict[str, Any]) -> tuple[dict[str, dict[str, str]], list[float] | None]:
    """Rows of an earlier run into ``output`` (by image) and its colour scale; refuses other settings.

    A last row cut short by an interruption is dropped (its image is done again).
    """
    csv_path, saved_path = output / "scores.csv", output / SETTINGS_FILE
    if not csv_path.is_file() or not saved_path.is_file():
        return {}, None
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    changed = [k for k, v in settings.items() if saved.get("settings", {}).get(k) != v]
    if changed:
        raise UsageError(
            f"--output {output} holds the predictions of a run with other {', '.join(changed)} "
            f"({saved_path}); choose another --output, or delete that folder to start over"
        )
    text = csv_path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1] if not text.endswith("\n") else text
    if complete != text:
        csv_path.write_text(complete, encoding="utf-8")
    rows = [r for r in csv.DictReader(complete.splitlines()) if None not in r.values() and r.get("panel")]
    return {r["image"]: r for r in rows}, saved.get("scale")


def _scale(
    args: argparse.Namespace, model: Detector | ExportedModel, saved: list[float] | None, first: Any
) -> list[float]:
    """The colour scale: the options, else an earlier run's, else the calibration's map range,
    else the range of the first batch's maps (``first()``)."""
    if saved is not None and args.vmin is None and args.vmax is None:
        return saved
    lo, hi = ((model.thresholds or {}).get("map_range") or [None, None])[:2]
    if lo is None or hi is None or hi <= lo:
        maps = first()
        lo, hi = float(np.min(maps)), float(np.max(maps))
        hi = hi if hi > lo else lo + 1.0
    vmin = args.vmin if args.vmin is not None else lo
    vmax = args.vmax if args.vmax is not None else hi
    if vmax <= vmin:
        raise UsageError(f"the colour scale {vmin:g}..{vmax:g} is empty; pass --vmin and --vmax")
    return [float(vmin), float(vmax)]


def write_outputs(
    args: argparse.Namespace,
    model: Detector | ExportedModel,
    files: list[Path],
    relative: list[Path],
    outs: list[Outputs],
) -> tuple[int, tuple[float, float]]:
    """Score ``files`` a batch at a time (bounded memory), write each image's files and its
    ``scores.csv`` row, then the report; returns how many were done before and the colour scale."""
    out = args.output
    make_folder(out, "--output")
    settings = _settings(args, model)
    finished, saved_scale = _finished(out, settings)
    todo = [i for i, rel in enumerate(relative) if rel.as_posix() not in finished]
    classes = [image_class(rel, args.cls) for rel in relative]
    first_batch: dict[str, Any] = {}

    def run(indices: list[int]) -> Any:
        return predict(
            model,
            [files[i] for i in indices],
            batch_size=len(indices),
            classes=[classes[i] for i in indices],
            threshold=args.threshold,
            pixel_threshold=args.pixel_threshold,
        )

    def first() -> np.ndarray:
        first_batch["result"] = run(todo[: args.batch_size])
        return first_batch["result"].maps

    vmin, vmax = _scale(args, model, saved_scale, first if todo else lambda: np.zeros(2))
    with _writing(out / SETTINGS_FILE):
        (out / SETTINGS_FILE).write_text(
            json.dumps({"settings": settings, "scale": [vmin, vmax]}, indent=2) + "\n", encoding="utf-8"
        )
    _write_legend(out, vmin, vmax, model, args)
    new_file = not (out / "scores.csv").is_file()
    with _writing(out / "scores.csv"), open(out / "scores.csv", "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(COLUMNS)
            handle.flush()
        batches = [todo[s : s + args.batch_size] for s in range(0, len(todo), args.batch_size)]
        progress = Progress(batches, "predict (batches)", logging.getLogger("mambaad").info, every_s=30.0)
        for n, chunk in enumerate(progress):
            result = first_batch.pop("result") if n == 0 and "result" in first_batch else run(chunk)
            for j, i in enumerate(chunk):
                row = _write_one(args, files[i], relative[i], outs[i], classes[i], result, j, (vmin, vmax))
                writer.writerow([row[c] for c in COLUMNS])
            handle.flush()  # a row stands for finished files: written after them, flushed per batch
    rows = list(csv.DictReader((out / "scores.csv").read_text(encoding="utf-8").splitlines()))
    write_predict_report(out, rows, (vmin, vmax), model)
    return len(relative) - len(todo), (vmin, vmax)


def _write_one(
    args: argparse.Namespace,
    path: Path,
    rel: Path,
    outputs: Outputs,
    cls: str | None,
    result: Any,
    j: int,
    scale: tuple[float, float],
) -> dict[str, str]:
    """The four files of one image (map, overlay, mask, panel) and its ``scores.csv`` row."""
    out = args.output
    amap, score = result.maps[j], float(result.scores[j])
    img_t, pix_t = float(result.image_thresholds[j]), float(result.pixel_thresholds[j])
    if args.size == "image":
        photo = read_image(path, None)
        amap = resize_map(amap, photo.shape[:2])
    else:
        photo = read_image(path, amap.shape)
    with np.errstate(invalid="ignore"):
        mask = amap >= pix_t
    label = "" if math.isnan(img_t) else ("anomalous" if score >= img_t else "normal")
    for folder in {(out / f).parent for f in (outputs.map, outputs.mask, outputs.panel)}:
        make_folder(folder, "--output")
    with _writing(out / outputs.map):
        np.save(out / outputs.map, amap.astype(np.float32))
    with _writing(out / outputs.overlay):
        Image.fromarray(overlay(photo, amap, *scale)).save(out / outputs.overlay, compress_level=1)
    with _writing(out / outputs.mask):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / outputs.mask)
    caption = f"{rel.as_posix()} | score {score:.4g} | {label or 'no threshold'} | {result.sources[j]}"
    with _writing(out / outputs.panel):
        picture = panel(photo, amap, mask, scale[0], scale[1], caption, pix_t)
        Image.fromarray(picture).save(out / outputs.panel, quality=90)
    return {
        "image": rel.as_posix(),
        "class": cls or "",
        "score": f"{score:.9g}",
        "label": label,
        "image_threshold": "" if math.isnan(img_t) else f"{img_t:.9g}",
        "pixel_threshold": "" if math.isnan(pix_t) else f"{pix_t:.9g}",
        "thresholds_from": result.sources[j],
        "anomalous_pixels": f"{float(mask.mean()):.6f}",
        "width": str(photo.shape[1]),
        "height": str(photo.shape[0]),
        "map": outputs.map.as_posix(),
        "overlay": outputs.overlay.as_posix(),
        "mask": outputs.mask.as_posix(),
        "panel": outputs.panel.as_posix(),
    }


def _write_legend(
    out: Path, vmin: float, vmax: float, model: Detector | ExportedModel, args: argparse.Namespace
) -> None:
    thresholds = model.thresholds
    if thresholds is None:
        origin = "no calibrated thresholds (evaluate the run or use tools/calibrate.py)"
    else:
        origin = _origin(thresholds)
    text = [
        "Outputs of tools/predict.py",
        "",
        SCALE_TEXT.format(vmin=f"{vmin:.4g}", vmax=f"{vmax:.4g}"),
        f"sizes: maps, overlays, masks at {SIZES[args.size]}",
        "<stem>.npy: float32 anomaly map; <stem>.png: heat-map overlay; masks/<stem>.png: binary mask "
        "(white = anomalous); panels/<stem>.jpg: photo | heat map | mask outline with the colour bar",
        "scores.csv: one row per image (label = score >= image_threshold; thresholds_from says which values)",
        f"decisions: {origin}",
        "report.html: open in a browser (no network needed)",
    ]
    with _writing(out / LEGEND_FILE):
        (out / LEGEND_FILE).write_text("\n".join(text) + "\n", encoding="utf-8")


def _origin(thresholds: dict[str, Any]) -> str:
    split, note = thresholds.get("split"), thresholds.get("note")
    return f"thresholds from {thresholds.get('source')} ({split}): {note}"


def write_predict_report(
    out: Path, rows: Sequence[dict[str, str]], scale: tuple[float, float], model: Detector | ExportedModel
) -> Path:
    """``report.html``: per-class counts and scores, the sorted scores with the threshold, the gallery."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["class"] or "(none)", []).append(r)
    table_rows, figures = [], []
    for cls, items in sorted(by_class.items()):
        scores = sorted(float(r["score"]) for r in items)
        table_rows.append(
            [
                cls,
                str(len(items)),
                str(sum(r["label"] == "anomalous" for r in items)),
                str(sum(r["label"] == "normal" for r in items)),
                f"{scores[0]:.4g}",
                f"{statistics.median(scores):.4g}",
                f"{scores[-1]:.4g}",
                items[0]["image_threshold"] or "n/a",
                items[0]["thresholds_from"],
            ]
        )
        marker = float(items[0]["image_threshold"]) if items[0]["image_threshold"] else None
        ranks = np.linspace(0.0, 1.0, len(scores)) if len(scores) > 1 else np.zeros(1)
        chart = line_chart([("score", scores, ranks)], "score", "fraction of images below", f"{cls}", marker)
        figures.append((f"{cls}: scores of {len(items)} image(s), dashed: image threshold", chart))
    header = [
        "class",
        "images",
        "anomalous",
        "normal",
        "min score",
        "median",
        "max score",
        "image threshold",
        "from",
    ]
    gallery = [
        GalleryItem(
            r["panel"],
            r["class"] or "(none)",
            r["label"] or "undecided",
            float(r["score"]),
            f"{r['image']} | score {float(r['score']):.4g} | {r['thresholds_from']}",
        )
        for r in rows
    ]
    thresholds = model.thresholds
    notes = [f"{len(rows)} image(s); outputs at the sizes given in {LEGEND_FILE}."]
    if thresholds is not None:
        notes.append(f"Decisions: {_origin(thresholds)}.")
    legend = SCALE_TEXT.format(vmin=f"{scale[0]:.4g}", vmax=f"{scale[1]:.4g}")
    counts = {d: sum(g.decision == d for g in gallery) for d in sorted({g.decision for g in gallery})}
    return write_report(
        out / REPORT_FILE,
        f"Predictions in {out.name}",
        notes,
        [table_html("per class", header, table_rows)],
        figures,
        gallery,
        legend,
        counts,
    )


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or an unwritable place while writing ``path`` becomes one paragraph naming it."""
    try:
        yield
    except OSError as err:
        if isinstance(err, UserError):  # already one paragraph naming its file (a nested write)
            raise
        intact = "the files written before it are complete; free some space and run predict again"
        failure = write_failure(err, path, "--output", intact)
        if failure is None:
            raise
        raise failure from err


if __name__ == "__main__":
    sys.exit(main())
