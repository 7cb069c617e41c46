"""UniAD on Uni-Medical, multi-class, with ADer's benchmark settings (configs/uniad_defaults.py).

The MambaAD paper's Table 1 row for UniAD on Uni-Medical comes from ADer's benchmark with these
settings (100 epochs; `trainer.epochs=300` for ADer's 300-epoch run).
"""

from configs.uniad_defaults import UniADDefaults


class UniADMedical(UniADDefaults):
    """ADer's benchmark setting on Uni-Medical; expects `datasets/medical/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/medical"
