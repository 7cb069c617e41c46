"""MambaAD on MVTec LOCO AD, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADLoco(MambaADDefaults):
    """Paper setting on MVTec LOCO AD; expects `datasets/mvtec_loco/meta.json` (see docs/data.md).

    As in ADer, the `validation` images are added to training. Logical and structural anomalies are
    also reported apart, as rows `<class>/logical`, `<class>/structural` (each with the class's
    normal test images) and their means `mean/logical`, `mean/structural`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/mvtec_loco"
        self.data.layout = "loco"
