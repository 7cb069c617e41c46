"""MambaAD on Real-IAD, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADRealiad(MambaADDefaults):
    """Paper setting on Real-IAD; expects `datasets/realiad/meta.json` (see docs/data.md).

    All five camera views are used (`data.views=None`); `data.views=['C1','C2']` keeps only those.
    Test items carry their sample id, so sample-level metrics can be computed. Real-IAD has about
    150k JPEGs: `data.cache=npy` stores them decoded once (about 30 GB at 256 px, under
    `datasets/realiad/.cache`), so that later epochs skip JPEG decoding.
    """

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/realiad"
        self.data.views = None
