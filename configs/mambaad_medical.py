"""MambaAD on Uni-Medical, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADMedical(MambaADDefaults):
    """Paper setting on Uni-Medical; expects `datasets/medical/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/medical"
