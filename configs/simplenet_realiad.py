"""SimpleNet on Real-IAD, multi-class, with ADer's benchmark settings (100 epochs, batch 32).

ADer's ``configs/benchmark/simplenet/simplenet_256_100e.py`` with the Real-IAD data (all five
views); the MambaAD paper's Table 1 SimpleNet row comes from ADer's benchmark, which has only a
100-epoch run on Real-IAD.
"""

from configs.simplenet_defaults import SimpleNetDefaults


class SimpleNetRealiad(SimpleNetDefaults):
    """ADer benchmark setting on Real-IAD; expects `datasets/realiad/meta.json` (see docs/data.md).

    All five camera views are used (`data.views=None`); `data.views=['C1','C2']` keeps only those.
    `data.cache=npy` stores the JPEGs decoded once (see configs/mambaad_realiad.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/realiad"
        self.data.views = None
