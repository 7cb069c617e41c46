"""UniAD on Real-IAD, multi-class, with ADer's benchmark settings (configs/uniad_defaults.py).

The MambaAD paper's Table 1 row for UniAD on Real-IAD comes from ADer's benchmark with these
settings (100 epochs; `trainer.epochs=300` for ADer's 300-epoch run).
"""

from configs.uniad_defaults import UniADDefaults


class UniADRealiad(UniADDefaults):
    """ADer's benchmark setting on Real-IAD; expects `datasets/realiad/meta.json` (see docs/data.md).

    All five camera views are used (`data.views=None`), as in configs/mambaad_realiad.py;
    `data.cache=npy` keeps the decoded images between epochs (see there).
    """

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/realiad"
        self.data.views = None
