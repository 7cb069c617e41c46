"""Demo: MambaAD on the embedded synthetic data set, small enough for a 2-core CPU in minutes.

The data (three classes with scratches, holes and stains, with pixel masks) is generated
into ``datasets/demo`` on first use. Images are scaled to 64x64 and training is short (12
epochs, about 7 minutes on 2 CPU cores). The teacher starts from random weights (with
BatchNorm statistics estimated on the training images) unless
``model.teacher.checkpoint=PATH`` names a local ResNet34 file, so scores are below what
ImageNet features give, yet well above chance.
"""

from configs.defaults import MambaADDefaults


class MambaADDemo(MambaADDefaults):
    """Paper architecture at a reduced input size and schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.use_demo_data()
        # 12 epochs: at 6 the training loss was still falling fast (19.1 at epoch 6, 14.4 at 12)
        self.trainer.epochs = 12  # lr decays x0.1 after epoch 10 (80 %)
        self.trainer.test_every = 12  # one evaluation, at the end
        self.trainer.log_every = 10
