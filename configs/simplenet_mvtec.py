"""SimpleNet on MVTec AD, multi-class, with ADer's benchmark settings (100 epochs, batch 32).

ADer's ``configs/benchmark/simplenet/simplenet_256_100e.py`` with the MVTec AD data root; the MambaAD
paper's Table 1 SimpleNet row comes from ADer's benchmark. ``trainer.epochs=300`` gives ADer's
300-epoch variant.
"""

from configs.simplenet_defaults import SimpleNetDefaults


class SimpleNetMvtec(SimpleNetDefaults):
    """ADer benchmark setting on MVTec AD; expects `datasets/mvtec/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/mvtec"
