"""MambaAD on MAD-Sim (the PAD paper's multi-pose LEGO toys, rendered), multi-class, paper settings."""

from configs.defaults import MambaADDefaults


class MambaADMadSim(MambaADDefaults):
    """Paper setting on MAD-Sim (20 classes); expects `datasets/mad_sim/meta.json` (see docs/data.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/mad_sim"
        self.data.layout = "mad_sim"
