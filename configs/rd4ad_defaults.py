"""Default settings of every RD4AD experiment: ADer's benchmark run (``configs/benchmark/rd/rd_256_100e.py``).

The RD4AD rows of the MambaAD paper's Table 1 come from ADer's benchmark (the same code and
settings; the numbers printed there are close to, not identical with, the current ADer README's
100-epoch rows). ADer's settings: 256x256 images, batch 16, 100 epochs, Adam (lr 0.005 for batch
16, betas 0.5/0.999, no weight decay: the config's ``weight_decay=0.05`` never reaches the
optimiser), the lr x0.1 after 80 % of the iterations (here after 80 % of the epochs: the same
step), gradient norm clipped at 5, loss ``CosLoss(avg=False)`` with weight 1, maps blurred with
sigma 4. ADer's 300-epoch variant (``rd_256_300e.py``) differs only in ``trainer.epochs=300``
(pass it on the command line; the decay then falls after epoch 240). The evaluator settings
are those of the MambaAD configs.
"""

from __future__ import annotations

from typing import Any

from configs.base import ADDefaults
from util.config import Section, int_at_least, number_at_least


class RD4ADDefaults(ADDefaults):
    """RD4AD on 256x256 images: WideResNet50-2 teacher (stages 1-3), MFF+OCE, ``de_wide_resnet50_2``."""

    # ADer's benchmark (configs/benchmark/*: use_adeval=True, evaluator.mode=ader) on float32 maps;
    # pooling_ks=None
    PAPER_EVALUATOR = {"mode": "ader", "map_dtype": "float32"}

    def __init__(self) -> None:
        super().__init__()
        self.data.image_size = 256
        self.data.batch_size = 16
        self.model = Section(
            type="rd4ad",
            # name: timm model and pretrained tag; wide_resnet50_2.racm_in1k is ADer's file
            # wide_resnet50_racm-8234f177.pth. pretrained=True downloads it (online machines only);
            # checkpoint=PATH loads a local timm/torchvision file instead. calibrate_batches: a
            # random teacher (neither of the above) gets BatchNorm statistics from this many
            # training batches before training; 0 disables it.
            teacher=Section(
                name="wide_resnet50_2.racm_in1k", pretrained=True, checkpoint=None, calibrate_batches=8
            ),
            bottleneck_blocks=3,  # OCE: Bottlenecks after the fused maps
            bottleneck_width=64,  # their width per group (ADer: 64; the RD4AD paper's code: 128)
            decoder_blocks=[3, 4, 6],  # de_wide_resnet50_2's three stages
            decoder_width=128,  # its width per group (wide: 2 x 64)
            sigma=4.0,  # Gaussian blur of the anomaly maps
            checkpoint=None,  # full RD4AD weights (ours or ADer's net.pth / ckpt.pth) to test or start from
            image_size=None,  # derived: data.image_size
        )
        self.loss = Section(type="feature_cos", weight=1.0)
        self.optim.type = "adam"
        self.optim.base_lr = 0.005  # for a batch of 16; scaled linearly with data.batch_size, as ADer
        self.optim.betas = (0.5, 0.999)
        self.optim.weight_decay = 0.0
        self.scheduler = Section(type="step", decay_at=0.8, gamma=0.1, milestones=None)
        self.trainer.epochs = 100  # ADer's benchmark; its 300-epoch variant: trainer.epochs=300
        self.trainer.grad_clip = 5.0

    def model_rules(self) -> dict[str, tuple[Any, str]]:
        """RD4AD's ``model`` keys: block counts, widths, sigma."""
        return {
            "model.bottleneck_blocks": int_at_least(1),
            "model.bottleneck_width": int_at_least(1),
            "model.decoder_blocks": (
                lambda v: (
                    isinstance(v, list | tuple)
                    and len(v) == 3
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)
                ),
                "three whole numbers of at least 1 (blocks per decoder stage), e.g. [3, 4, 6]",
            ),
            "model.decoder_width": int_at_least(1),
            "model.sigma": number_at_least(0),
            "model.teacher.calibrate_batches": int_at_least(0),
        }
