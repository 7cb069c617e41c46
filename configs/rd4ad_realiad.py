"""RD4AD on Real-IAD, multi-class, with ADer's benchmark settings (100 epochs, batch 16).

ADer's ``configs/benchmark/rd/rd_256_100e.py`` with the Real-IAD data (all five views); the
MambaAD paper's Table 1 RD4AD row comes from ADer's benchmark, which has only a 100-epoch run
on Real-IAD.
"""

from configs.rd4ad_defaults import RD4ADDefaults


class RD4ADRealiad(RD4ADDefaults):
    """ADer benchmark setting on Real-IAD; expects `datasets/realiad/meta.json` (see docs/data.md).

    All five camera views are used (`data.views=None`); `data.views=['C1','C2']` keeps only those.
    `data.cache=npy` stores the JPEGs decoded once (see configs/mambaad_realiad.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/realiad"
        self.data.views = None
