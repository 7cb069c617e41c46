"""Demo: SimpleNet on the embedded synthetic data set, small enough for a 2-core CPU in minutes.

The data (three classes with scratches, holes and stains, with pixel masks) is generated into
``datasets/demo`` on first use, as for configs/mambaad_demo.py, so the methods can be compared on
it. Images are 64x64 (an 8x8 grid of patch features) in batches of 8. The model is ADer's full
SimpleNet (72.8 M parameters); the backbone starts from random weights (BatchNorm statistics
estimated on the training images) unless ``model.teacher.checkpoint=PATH`` names a local
WideResNet50-2 file, so scores stay below what ImageNet features give.
"""

from configs.simplenet_defaults import SimpleNetDefaults


class SimpleNetDemo(SimpleNetDefaults):
    """ADer's SimpleNet at a reduced input size and schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.use_demo_data()
        self.trainer.epochs = 5
        self.trainer.test_every = 5  # one evaluation, at the end
        self.trainer.log_every = 10
