"""UniAD on VisA, multi-class, with ADer's benchmark settings (configs/uniad_defaults.py).

The MambaAD paper's Table 1 row for UniAD on VisA comes from ADer's benchmark with these
settings (100 epochs; `trainer.epochs=300` for ADer's 300-epoch run).
"""

from configs.uniad_defaults import UniADDefaults


class UniADVisa(UniADDefaults):
    """ADer's benchmark setting on VisA; expects `datasets/visa/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/visa"
