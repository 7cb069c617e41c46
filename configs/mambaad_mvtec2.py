"""MambaAD on MVTec AD 2, multi-class, with the paper's settings (500 epochs, batch 16)."""

from configs.defaults import MambaADDefaults
from evaluation.metrics_exact import METRIC_NAMES


class MambaADMvtec2(MambaADDefaults):
    """Paper setting on MVTec AD 2 (test_public); expects `datasets/mvtec2/meta.json` (see docs/data.md).

    Its `validation` images (normal only) are held out of training and scored apart from the test
    set (`data.validation=held_out`), so that a threshold can be chosen on them (SegF1). The private
    test sets have no ground truth and are not used.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data.root = "datasets/mvtec2"
        self.data.layout = "mvtec2"
        self.data.validation = "held_out"
        # MVTec AD 2's own metric beside the seven: SegF1 at mean + 3 std of the validation pixels
        self.evaluator.metrics = [*METRIC_NAMES, "SegF1"]
        self.evaluator.segf1_threshold = "validation"
