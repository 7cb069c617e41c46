"""Anomaly maps and scores for new images with a trained model.

    python tools/predict.py -c configs/mambaad_demo.py --checkpoint runs/RUN/net.pth \\
        --input path/to/images --output predictions/
    python tools/predict.py --checkpoint runs/RUN --input path/to/images --output predictions/

Without ``-c`` the config comes from the run folder's ``config.json`` (a run folder or a
file inside one), else the paper model (official checkpoints). The model code is the
Python API's (``mambaad.load_model`` / ``mambaad.predict``).

Writes, per image, ``<stem>.npy`` (float32 anomaly map at the model's input size, after
the Gaussian blur), ``<stem>.png`` (the image with a heat-map overlay) and one
``scores.csv`` (image, score). Overlays share one colour scale (the maps' global min and
max unless ``--vmin/--vmax`` are given), so colours compare across images.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.default_ad import load_image
from data.meta import IMAGE_EXTENSIONS
from mambaad import load_model, predict_batch
from util.config import ConfigError
from util.distributed import resolve_device
from util.logger import get_logger


def list_images(path: Path) -> list[Path]:
    """One image, or every image below a folder (sorted)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--input {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def output_names(files: list[Path], root: Path) -> list[str]:
    """Output base names: the file stem, or the path below ``root`` joined by '__' when stems repeat."""
    stems = [p.stem for p in files]
    if len(set(stems)) == len(stems) or root.is_file():
        return stems
    return ["__".join(p.relative_to(root).with_suffix("").parts) for p in files]


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
    parser.add_argument(
        "-c", "--config", default=None, help="the config the model was trained with (default: the run's)"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder, its net.pth / ckpt.pth, or an official file"
    )
    parser.add_argument("--input", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for .npy maps, overlays and scores.csv"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vmin", type=float, default=None, help="heat-map colour scale minimum")
    parser.add_argument("--vmax", type=float, default=None, help="heat-map colour scale maximum")
    parser.add_argument("overrides", nargs="*", help="config overrides such as model.scan.backend=ref")
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    """Predict every input image; returns the process exit code."""
    args = parse_args(argv)
    log = get_logger()
    try:
        model = load_model(args.checkpoint, config=args.config, overrides=args.overrides, log=log)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    device = resolve_device(model.cfg.device)
    model.net.to(device)
    model.device = device
    files = list_images(args.input)
    names = dict(zip(files, output_names(files, args.input), strict=True))
    size = model.image_size
    args.output.mkdir(parents=True, exist_ok=True)

    maps: list[np.ndarray] = []
    scores: list[float] = []
    for start in tqdm(range(0, len(files), args.batch_size), desc="predict", unit="batch"):
        chunk = files[start : start + args.batch_size]
        batch_maps, batch_scores = predict_batch(model, chunk)
        for path, amap, score in zip(chunk, batch_maps.cpu().numpy(), batch_scores.tolist(), strict=True):
            np.save(args.output / f"{names[path]}.npy", amap.astype(np.float32))
            maps.append(amap)
            scores.append(score)

    vmin = args.vmin if args.vmin is not None else float(min(m.min() for m in maps))
    vmax = args.vmax if args.vmax is not None else float(max(m.max() for m in maps))
    for path, amap in zip(files, maps, strict=True):
        rgb = load_image(path, size, normalize=False).permute(1, 2, 0).numpy()
        Image.fromarray(overlay((rgb * 255).round().astype(np.uint8), amap, vmin, vmax)).save(
            args.output / f"{names[path]}.png"
        )
    with open(args.output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score"])
        writer.writerows([str(p), f"{s:.6f}"] for p, s in zip(files, scores, strict=True))
    log.info(
        "wrote %d maps, overlays and scores.csv to %s (colour scale %.4f..%.4f)",
        len(files),
        args.output,
        vmin,
        vmax,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
