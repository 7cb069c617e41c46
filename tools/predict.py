"""Anomaly maps and scores for new images with a trained model.

    python tools/predict.py -c configs/mambaad_demo.py --checkpoint runs/RUN/net.pth \\
        --input path/to/images --output predictions/
    python tools/predict.py --checkpoint runs/RUN --input path/to/images --output predictions/

Without ``-c`` the config comes from the run folder's ``config.json`` (a run folder or a
file inside one), read as data without running any code, else the paper model (official
checkpoints). A ``-c`` config file is Python and runs: pass only files you trust. The model
code is the Python API's (``mambaad.load_model`` / ``mambaad.predict``). With ``--model``
(an exported ``model.onnx`` / ``model.xml``) PyTorch is not imported at all.

Writes, per image, ``<stem>.npy`` (float32 anomaly map at the model's input size, after
the Gaussian blur) and ``<stem>.png`` (the image with a heat-map overlay), in the sub-folder
the image has below ``--input``; images whose stems clash in one folder (``a.png`` and
``a.jpg``) keep their extension instead (``a.png.npy``, ``a.jpg.npy``), so every input gets
its own files. One ``scores.csv`` lists, per image, its path below ``--input``, its score and
its two output files (paths below ``--output``). Overlays share one colour scale (the maps'
global min and max unless ``--vmin/--vmax`` are given), so colours compare across images.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.meta import IMAGE_EXTENSIONS
from deploy.runtime import ExportedModel, ModelFileError, read_image
from mambaad import Detector, load_model, predict
from util.cli import add_config_args, report_error
from util.errors import UsageError, make_folder, write_failure
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


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a blue-cyan-yellow-red ramp (jet-like)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colors = np.array([[0, 0, 160], [0, 220, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    rgb = np.stack([np.interp(v[..., 0], stops, colors[:, c]) for c in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend the heat map of ``amap`` (scaled to [vmin, vmax]) over an RGB uint8 image."""
    scaled = (amap - vmin) / max(vmax - vmin, 1e-12)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heat_colors(scaled).astype(np.float32)
    return blended.round().astype(np.uint8)


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
        bases = output_names(relative)
        npys = [with_extension(b, ".npy") for b in bases]
        pngs = [with_extension(b, ".png") for b in bases]
        check_output(args.output, files, [args.output / f for f in npys + pngs])
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
        vmin, vmax = write_outputs(args, model, files, relative, npys, pngs)
    except Exception as err:  # e.g. an input that cannot be decoded (the message names it)
        return report_error(err, args)
    log.info(
        "wrote %d maps and overlays (one per input image) and scores.csv to %s (colour scale %.4f..%.4f)",
        len(files),
        args.output,
        vmin,
        vmax,
    )
    return 0


def write_outputs(
    args: argparse.Namespace,
    model: Detector | ExportedModel,
    files: list[Path],
    relative: list[Path],
    npys: list[Path],
    pngs: list[Path],
) -> tuple[float, float]:
    """Score ``files``; write each map, overlay and ``scores.csv``; return the colour scale used."""
    size = model.image_size
    for folder in sorted({(args.output / f).parent for f in npys}):
        make_folder(folder, "--output")
    maps: list[np.ndarray] = []
    scores: list[float] = []
    batches = range(0, len(files), args.batch_size)
    for start in Progress(batches, "predict (batches)", logging.getLogger("mambaad").info):
        chunk = files[start : start + args.batch_size]
        batch = predict(model, chunk, batch_size=len(chunk))
        for i, amap, score in zip(
            range(start, start + len(chunk)), batch.maps, batch.scores.tolist(), strict=True
        ):
            with _writing(args.output / npys[i]):
                np.save(args.output / npys[i], amap.astype(np.float32))
            maps.append(amap)
            scores.append(score)

    vmin = args.vmin if args.vmin is not None else float(min(m.min() for m in maps))
    vmax = args.vmax if args.vmax is not None else float(max(m.max() for m in maps))
    for path, amap, png in zip(files, maps, pngs, strict=True):
        # the pixels the model saw (RGB, bilinear resize; equal to the training loader's)
        rgb = read_image(path, size)
        with _writing(args.output / png):
            Image.fromarray(overlay(rgb, amap, vmin, vmax)).save(args.output / png)
    with _writing(args.output / "scores.csv"), open(args.output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score", "map", "overlay"])
        writer.writerows(
            [rel.as_posix(), f"{s:.6f}", npy.as_posix(), png.as_posix()]
            for rel, s, npy, png in zip(relative, scores, npys, pngs, strict=True)
        )
    return vmin, vmax


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or an unwritable place while writing ``path`` becomes one paragraph naming it."""
    try:
        yield
    except OSError as err:
        intact = "the files written before it are complete; free some space and run predict again"
        failure = write_failure(err, path, "--output", intact)
        if failure is None:
            raise
        raise failure from err


if __name__ == "__main__":
    sys.exit(main())
