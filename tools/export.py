"""Export a trained MambaAD model (the whole inference path) to ONNX, OpenVINO IR or TorchScript.

    python tools/export.py -c configs/mambaad_mvtec.py --checkpoint runs/RUN/net.pth \\
        --format onnx --out export/ [--image-size 256] [--batch dynamic|B] [--fp16]
    python tools/export.py --checkpoint runs/RUN --format openvino --out export_ov/

The exported model takes uint8 RGB images ``images [B, H, W, 3]`` (NHWC) and returns
``anomaly_map [B, H, W]`` (blurred, as ``mambaad.predict``) and ``score [B]``. Beside it,
``model.json`` records the input contract, normalisation, training data, config hash and
project version. Without ``-c`` the config comes from the run folder's ``config.json`` (read
as data), else the paper model. Run the result without PyTorch with ``deploy/runtime.py``;
see docs/deploy.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.export import FORMATS, export
from util.cli import add_config_args, report_error
from util.logger import get_logger


def batch_arg(text: str) -> int | None:
    """``dynamic`` -> None, else a positive integer."""
    if text.strip().lower() == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder, its net.pth / ckpt.pth, or an official file"
    )
    parser.add_argument("--format", default="onnx", choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path, help="folder for the model and model.json")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: data.image_size)")
    parser.add_argument("--batch", type=batch_arg, default=None, help="'dynamic' (default) or a fixed batch")
    parser.add_argument(
        "--fp16", action="store_true", help="store weights as float16 (onnx, openvino); compute stays float32"
    )
    parser.add_argument(
        "--exporter",
        default="torchscript",
        choices=("torchscript", "dynamo"),
        help="PyTorch's ONNX exporter (torchscript: tracing, fast; dynamo: torch.export)",
    )
    add_config_args(
        parser,
        required=False,
        print_config=False,
        config_help="the config the model was trained with",
        overrides_help="config overrides such as model.scan.method=zigzag",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Export; returns the process exit code (2: usage or checkpoint/config mismatch)."""
    args = parse_args(argv)
    log = get_logger()
    try:
        export(
            args.checkpoint,
            args.out,
            fmt=args.format,
            config=args.config,
            overrides=args.overrides,
            image_size=args.image_size,
            batch=args.batch,
            fp16=args.fp16,
            exporter=args.exporter,
            log=log,
        )
    except Exception as err:
        return report_error(err, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
