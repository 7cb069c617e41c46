"""SimpleNet's defaults: ADer's benchmark settings (``configs/benchmark/simplenet/simplenet_256_100e.py``).

The MambaAD paper's Table 1 rows for SimpleNet are ADer's benchmark runs: 256x256 images, batch
32, 100 epochs, torchvision's WideResNet50-2 (``layer2`` and ``layer3``), ADer's learning rate
``0.001 x batch / 32`` split by its ``SimpleNetTrainer`` into two optimisers: AdamW over the
adaptor at 0.1 x that (1e-4, weight decay 0.01) and Adam over the discriminator at 0.2 x (2e-4,
weight decay 1e-5 as an L2 term), both betas 0.9/0.999, biases and 1-D tensors undecayed, each
clipped to gradient norm 5 on its own parameters. ADer's config asks for a x0.1 step after 80 %
of the epochs, but its scheduler is attached to the trainer's generic optimiser, which the
SimpleNet trainer never steps: the two optimisers keep their learning rate for the whole run.
Here the schedule is therefore constant (``scheduler.gamma=1.0``); ``scheduler.gamma=0.1`` gives
the decay ADer's config meant. The image score is the map's maximum (ADer's evaluator,
``pooling_ks=None``). ADer's 300-epoch variant differs only in ``trainer.epochs=300``.
"""

from __future__ import annotations

from typing import Any

from configs.base import ADDefaults
from util.config import Section, int_at_least, number_at_least, one_of


class SimpleNetDefaults(ADDefaults):
    """SimpleNet on 256x256 images: frozen WideResNet50-2 patch features, linear adaptor, discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.data.image_size = 256
        self.data.batch_size = 32
        self.model = Section(
            type="simplenet",
            # the frozen backbone: ADer's tv_wide_resnet50_2 with pretrained=True loads torchvision's
            # wide_resnet50_2-95faca4d.pth, timm's wide_resnet50_2.tv_in1k. checkpoint=PATH loads a
            # local torchvision/timm file instead (offline); calibrate_batches: BatchNorm statistics
            # for a random backbone (neither of them).
            teacher=Section(
                name="wide_resnet50_2.tv_in1k", pretrained=True, checkpoint=None, calibrate_batches=8
            ),
            layers=["layer2", "layer3"],  # backbone layers whose features are used
            patch_size=3,  # neighbourhood aggregated around each position
            patch_stride=1,
            embed_dim=1536,  # each layer's neighbourhood pooled to this many values
            target_dim=1536,  # the layers pooled together: the adapted features' width
            adaptor_layers=1,  # linear maps of the feature adaptor (ADer's pre_proj)
            dsc_layers=2,  # discriminator: dsc_layers - 1 hidden blocks, then the score
            dsc_hidden=1024,
            noise_std=0.015,  # standard deviation of the Gaussian noise making the fake features
            mix_noise=1,  # noise scales noise_std * 1.1**k, k < mix_noise, one drawn per feature
            margin=0.5,  # of the truncated L1 loss: normal scores above it, noisy ones below -margin
            sigma=4.0,  # Gaussian blur of the anomaly maps
            # building ADer's model runs one all-ones image through the backbone in training mode,
            # moving its BatchNorm statistics 10 % toward that image's; True does the same
            ader_bn_probe=True,
            checkpoint=None,  # full SimpleNet weights (ours, or ADer's net.pth / ckpt.pth)
            image_size=None,  # derived: data.image_size
        )
        self.loss = Section(type="truncated_l1", weight=1.0)  # ADer's SumLoss of the two terms, lam 1
        self.optim.type = "adamw"  # the adaptor's; the discriminator's is Adam (model/simplenet)
        # ADer: lr = 0.001 * batch / 32; our rule lr = base_lr * batch / 16 gives the same with 5e-4
        self.optim.base_lr = 5e-4
        self.optim.betas = (0.9, 0.999)
        self.optim.weight_decay = 0.01  # the adaptor's; the discriminator gets 1e-3 of it
        self.scheduler = Section(
            type="step", decay_at=0.8, gamma=1.0, milestones=None
        )  # constant, as ADer ran
        self.trainer.epochs = 100  # ADer's benchmark; its 300-epoch variant: trainer.epochs=300
        self.trainer.grad_clip = 5.0

    def model_rules(self) -> dict[str, tuple[Any, str]]:
        """SimpleNet's ``model`` keys (and its loss, which its training needs)."""
        layers = ("layer1", "layer2", "layer3", "layer4")
        return {
            "model.layers": (
                lambda v: isinstance(v, list | tuple) and len(v) >= 1 and all(x in layers for x in v),
                "a list of backbone layers among " + ", ".join(layers) + ", e.g. [layer2, layer3]",
            ),
            "model.patch_size": (
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1,
                "an odd whole number of at least 1",
            ),
            "model.patch_stride": int_at_least(1),
            "model.embed_dim": int_at_least(1),
            "model.target_dim": int_at_least(1),
            "model.adaptor_layers": int_at_least(1),
            "model.dsc_layers": int_at_least(1),
            "model.dsc_hidden": int_at_least(1),
            "model.noise_std": number_at_least(0),
            "model.mix_noise": int_at_least(1),
            "model.margin": number_at_least(0),
            "model.sigma": number_at_least(0),
            "model.ader_bn_probe": one_of(True, False),
            "model.teacher.pretrained": one_of(True, False),
            "model.teacher.calibrate_batches": int_at_least(0),
            "loss.type": one_of("truncated_l1"),
        }
