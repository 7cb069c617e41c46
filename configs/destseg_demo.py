"""Demo: DeSTSeg on the embedded synthetic data set, small enough for a 2-core CPU in minutes.

The data set is MambaAD's demo (``configs/mambaad_demo.py``), generated into ``datasets/demo`` on
first use, so the methods can be compared on it. Images are scaled to 64x64 and training is short
(10 epochs: 2 for the student, 8 for the segmentation network). The model is ADer's full DeSTSeg
(35.2 M parameters). The teacher starts from random weights (with BatchNorm statistics estimated
on the training images) unless ``model.teacher.checkpoint=PATH`` names a local ResNet18 file, and
the pasted anomalies are PROCEDURAL textures (logged), not DTD's, so no download is needed; scores
are below what ImageNet features and DTD give.
"""

from configs.destseg_defaults import DeSTSegDefaults


class DeSTSegDemo(DeSTSegDefaults):
    """ADer's DeSTSeg at a reduced input size and schedule, with procedural textures."""

    def __init__(self) -> None:
        super().__init__()
        self.use_demo_data()
        self.data.anomaly_source.type = "procedural"
        self.data.anomaly_source.root = None
        self.trainer.epochs = 10
        self.trainer.test_every = 10  # one evaluation, at the end
        self.trainer.log_every = 10
