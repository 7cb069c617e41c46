"""MambaAD on MAD-Real (the PAD paper's multi-pose LEGO toys, photographed), multi-class, paper settings."""

from configs.defaults import MambaADDefaults


class MambaADMadReal(MambaADDefaults):
    """Paper setting on MAD-Real (10 classes); expects `datasets/mad_real/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/mad_real"
        self.data.layout = "mad_real"
