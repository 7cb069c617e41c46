"""MambaAD on COCO-AD, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults


class MambaADCoco(MambaADDefaults):
    """Paper setting on COCO-AD split 0; expects `datasets/coco/meta_20_0.json` (see docs/data.md).

    COCO-AD has four splits (`tools/prepare_data.py --dataset coco` writes `meta_20_0.json` ...
    `meta_20_3.json`); select another with `data.meta_file=meta_20_1.json`. One class, `coco`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.use_paper_protocol()  # score as the authors did (docs/metrics.md)
        self.data.root = "datasets/coco"
        self.data.meta_file = "meta_20_0.json"
