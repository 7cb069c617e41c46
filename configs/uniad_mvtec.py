"""UniAD on MVTec AD, multi-class, with ADer's benchmark settings (configs/uniad_defaults.py).

The MambaAD paper's Table 1 row for UniAD on MVTec AD comes from ADer's benchmark with these
settings (100 epochs; `trainer.epochs=300` for ADer's 300-epoch run).
"""

from configs.uniad_defaults import UniADDefaults


class UniADMvtec(UniADDefaults):
    """ADer's benchmark setting on MVTec AD; expects `datasets/mvtec/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/mvtec"
