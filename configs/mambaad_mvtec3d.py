"""MambaAD on MVTec 3D-AD (RGB), multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADMvtec3d(MambaADDefaults):
    """Paper setting on MVTec 3D-AD (RGB); expects `datasets/mvtec3d/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/mvtec3d"
