"""MambaAD on Real-IAD, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADRealiad(MambaADDefaults):
    """Paper setting on Real-IAD; expects `datasets/realiad/meta.json` (see README, Data)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/realiad"
