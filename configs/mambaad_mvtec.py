"""MambaAD on MVTec AD, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADMvtec(MambaADDefaults):
    """Paper setting on MVTec AD; expects `datasets/mvtec/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/mvtec"
