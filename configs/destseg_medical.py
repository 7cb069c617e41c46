"""DeSTSeg on Uni-Medical, multi-class, with ADer's benchmark settings (configs/destseg_defaults.py).

The MambaAD paper's Table 1 DeSTSeg row on Uni-Medical comes from ADer's benchmark with these settings
(100 epochs; `trainer.epochs=300` for ADer's 300-epoch run). Needs a prepared DTD copy at
`data.anomaly_source.root` (docs/data.md, "Anomaly sources").
"""

from configs.destseg_defaults import DeSTSegDefaults


class DeSTSegMedical(DeSTSegDefaults):
    """ADer's benchmark setting on Uni-Medical; expects `datasets/medical/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/medical"
