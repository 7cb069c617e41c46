"""MambaAD with both MMAD-style options on MVTec AD: grouped scanning and the dilated Mamba fuser.

Our design after the description in MMAD's README ("group scanning", "Dilated Mamba Fuser");
MMAD publishes no code or paper details, so this is not MMAD. Everything else is the paper's
MVTec setting (configs/mambaad_mvtec.py).
"""

from configs.mambaad_mvtec import MambaADMvtec


class MMADMvtec(MambaADMvtec):
    """Paper MVTec setting with ``model.scan.grouped`` and ``model.bottleneck.type=dilated_mamba``."""

    def __init__(self) -> None:
        super().__init__()
        self.model.scan.grouped = True
        self.model.bottleneck.type = "dilated_mamba"
        self.model.bottleneck.dilations = [2, 4]  # at 256x256 the fuser's map is 16x16
