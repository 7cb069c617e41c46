"""Demo: UniAD on the embedded synthetic data set, small enough for a 2-core CPU in minutes.

The data (three classes with scratches, holes and stains, with pixel masks) is generated into
``datasets/demo`` on first use, as for configs/mambaad_demo.py. Images are 64x64, so the
stride-16 feature map is 4x4: the neighbour mask is ADer's rule at that size (image_size // 32
= 2, a 3x3 window) and the score's average filter shrinks with the image (4 = 16 x 64 / 256).
The backbone starts from random weights (BatchNorm statistics estimated on the training images)
unless ``model.teacher.checkpoint=PATH`` names a local tf_efficientnet_b4 file, so scores stay
below what ImageNet features give. Everything else is ADer's benchmark setting, except the
schedule (fewer epochs).
"""

from configs.uniad_defaults import UniADDefaults


class UniADDemo(UniADDefaults):
    """ADer's UniAD at a reduced input size and schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.use_demo_data()
        self.model.score_pool = 4
        # about 45 s per epoch (22 steps of 8) on 2 CPU cores, so 5 epochs take about 4 minutes
        self.trainer.epochs = 5  # lr decays x0.1 after epoch 4 (80 %)
        self.trainer.test_every = 5  # one evaluation, at the end
        self.trainer.log_every = 10
