"""Demo: RD4AD on the embedded synthetic data set, small enough for a 2-core CPU in minutes.

The data set is MambaAD's demo (``configs/mambaad_demo.py``): three classes with scratches, holes
and stains, with pixel masks, generated into ``datasets/demo`` on first use, so both methods can
be compared on it. Images are scaled to 64x64 and training is short (10 epochs, about 3 minutes
on 2 CPU cores). The model is ADer's full RD4AD (80.6 M parameters). The teacher starts from
random weights (with BatchNorm statistics estimated on the training images) unless
``model.teacher.checkpoint=PATH`` names a local WideResNet50-2 file, so scores are below what
ImageNet features give.
"""

from configs.rd4ad_defaults import RD4ADDefaults


class RD4ADDemo(RD4ADDefaults):
    """ADer's RD4AD at a reduced input size and schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.use_demo_data()
        self.trainer.epochs = 10  # lr decays x0.1 after epoch 8 (80 %)
        self.trainer.test_every = 10  # one evaluation, at the end
        self.trainer.log_every = 10
