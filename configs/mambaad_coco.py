"""MambaAD on COCO-AD, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADCoco(MambaADDefaults):
    """Paper setting on COCO-AD; expects `datasets/coco/meta.json` (see README, Data)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/coco"
