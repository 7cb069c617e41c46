"""RD4AD on Uni-Medical, multi-class, with ADer's benchmark settings (100 epochs, batch 16).

ADer's ``configs/benchmark/rd/rd_256_100e.py`` with the Uni-Medical data root; the MambaAD paper's
Table 1 RD4AD row comes from ADer's benchmark. ``trainer.epochs=300`` gives ADer's 300-epoch variant.
"""

from configs.rd4ad_defaults import RD4ADDefaults


class RD4ADMedical(RD4ADDefaults):
    """ADer benchmark setting on Uni-Medical; expects `datasets/medical/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/medical"
