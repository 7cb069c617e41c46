"""DeSTSeg's defaults: ADer's benchmark run (``configs/benchmark/destseg/destseg_256_100e.py``).

The MambaAD paper's Table 1 DeSTSeg rows come from ADer's benchmark, so these are the values
behind them: 256x256 images, batch 32, 100 epochs, seed 42; a frozen ResNet18 teacher
(torchvision's ImageNet weights, stages 1-3), a random ResNet18 student encoder with its
decoder, and the segmentation network. Training has two stages: the first fifth of the epochs
trains the student (SGD, lr 40 x 0.01, momentum 0.9, weight decay 1e-4 except 1-D tensors and
biases) on the cosine-sum loss, the rest trains the segmentation network (SGD, lr 10 x 0.01 for its
residual stage and 0.01 for its head, momentum 0.9, weight decay 1e-4 everywhere) on L1 + focal
loss (gamma 4) against the synthetic masks; gradients clipped to norm 5. ADer's step schedule
belongs to an optimiser that never steps, so both learning rates stay constant (here:
``scheduler.milestones=[]``). Anomalies are DTD textures pasted inside Perlin masks
(``data.anomaly_source``). ADer's 300-epoch variant (``destseg_256_300e.py``) differs only in
``trainer.epochs=300`` (the student then trains for 60 epochs).
"""

from __future__ import annotations

from typing import Any

from configs.base import ADDefaults
from util.config import Section, int_at_least, number_at_least, one_of


class DeSTSegDefaults(ADDefaults):
    """DeSTSeg on 256x256 images: ResNet18 teacher, denoising student, segmentation network."""

    def __init__(self) -> None:
        super().__init__()
        self.data.type = "SynthesizedAD"
        self.data.image_size = 256
        self.data.batch_size = 32
        # the textures pasted into training images: dtd (the authors' source; prepare the downloaded
        # copy with tools/prepare_data.py --dataset dtd) or procedural (demos and tests only).
        # seed: derived from the run's seed; the synthesis of an item depends on (seed, epoch, index)
        self.data.anomaly_source = Section(type="dtd", root="datasets/dtd", seed=None)
        self.model = Section(
            type="destseg",
            # the frozen teacher, a timm name with the weights' tag: resnet18.tv_in1k is ADer's file
            # resnet18-5c106cde.pth (the same tensors); pretrained=True downloads it, checkpoint=PATH
            # reads a local timm/torchvision file, calibrate_batches gives a random teacher BatchNorm
            # statistics from this many training batches (0: off)
            teacher=Section(name="resnet18.tv_in1k", pretrained=True, checkpoint=None, calibrate_batches=8),
            student="resnet18",  # timm encoder of the student (random weights)
            seg_width=256,  # channels of the segmentation network
            aspp_rates=[6, 12, 18],  # its ASPP dilation rates
            student_fraction=0.2,  # share of the epochs that trains the student (ADer: epoch < epochs / 5)
            student_lr_scale=40.0,  # the student's lr over optim.lr
            res_lr_scale=10.0,  # the segmentation network's residual stage's lr over optim.lr
            head_lr_scale=1.0,  # its ASPP head's lr over optim.lr
            score_top_k=100,  # an image's score: the mean of its k highest segmentation outputs
            checkpoint=None,  # full DeSTSeg weights (ours or ADer's net.pth / ckpt.pth)
            image_size=None,  # derived: data.image_size
        )
        self.loss = Section(type="destseg", weight=1.0, focal_gamma=4.0, focal_alpha=-1.0)
        self.optim.type = "sgd"
        self.optim.base_lr = 0.005  # for a batch of 16: 0.01 at ADer's batch 32 (lr = 0.01 * batch / 32)
        self.optim.momentum = 0.9
        self.optim.weight_decay = 1e-4
        self.scheduler.milestones = []  # constant learning rates, as ADer's DeSTSeg optimisers run
        self.trainer.epochs = 100
        self.trainer.grad_clip = 5.0

    def derive(self) -> None:
        """Also derive the synthesis seed from the run's ``seed``."""
        super().derive()
        self.set_derived("data.anomaly_source.seed", self.seed)

    def model_rules(self) -> dict[str, tuple[Any, str]]:
        """DeSTSeg's ``model``, ``loss`` and ``data.anomaly_source`` keys."""
        return {
            "model.seg_width": int_at_least(1),
            "model.aspp_rates": (
                lambda v: isinstance(v, list | tuple) and all(isinstance(r, int) and r >= 1 for r in v),
                "a list of whole numbers of at least 1, e.g. [6, 12, 18]",
            ),
            "model.student_fraction": (
                lambda v: isinstance(v, int | float) and 0 <= v <= 1,
                "a number in [0, 1]: the share of trainer.epochs that trains the student",
            ),
            "model.student_lr_scale": number_at_least(0),
            "model.res_lr_scale": number_at_least(0),
            "model.head_lr_scale": number_at_least(0),
            "model.score_top_k": int_at_least(1),
            "model.teacher.calibrate_batches": int_at_least(0),
            "loss.type": one_of("destseg"),
            "loss.focal_gamma": number_at_least(0),
            "data.type": one_of("SynthesizedAD"),
            "data.anomaly_source.type": one_of("dtd", "procedural"),
        }
