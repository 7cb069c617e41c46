"""DeSTSeg on MVTec AD, multi-class, with ADer's benchmark settings (configs/destseg_defaults.py).

The MambaAD paper's Table 1 DeSTSeg row on MVTec AD comes from ADer's benchmark with these settings
(100 epochs; `trainer.epochs=300` for ADer's 300-epoch run). Needs a prepared DTD copy at
`data.anomaly_source.root` (docs/data.md, "Anomaly sources").
"""

from configs.destseg_defaults import DeSTSegDefaults


class DeSTSegMvtec(DeSTSegDefaults):
    """ADer's benchmark setting on MVTec AD; expects `datasets/mvtec/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/mvtec"
