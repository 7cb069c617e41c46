"""DeSTSeg on Real-IAD, multi-class, with ADer's benchmark settings (configs/destseg_defaults.py).

The MambaAD paper's Table 1 DeSTSeg row on Real-IAD comes from ADer's benchmark with these settings
(100 epochs; `trainer.epochs=300` for ADer's 300-epoch run). Needs a prepared DTD copy at
`data.anomaly_source.root` (docs/data.md, "Anomaly sources").
"""

from configs.destseg_defaults import DeSTSegDefaults


class DeSTSegRealiad(DeSTSegDefaults):
    """ADer's benchmark setting on Real-IAD; expects `datasets/realiad/meta.json` (see docs/data.md).

    All five camera views are used (`data.views=None`); `data.cache=npy` stores the JPEGs decoded once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/realiad"
        self.data.views = None
