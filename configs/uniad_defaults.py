"""UniAD's defaults: ADer's benchmark settings (``configs/benchmark/uniad/uniad_256_100e.py``).

The MambaAD paper's Table 1 rows for UniAD are ADer's benchmark runs, so these are the values
behind those numbers: 256x256 images, batch 8, 100 epochs, AdamW (lr 1e-4, weight decay 1e-4,
betas 0.9/0.999), the learning rate x0.1 after 80 % of the epochs, gradients clipped to norm 5
(ADer's common ``loss.clip_grad``), the plain MSE between aligned and reconstructed features
(ADer's ``L2Loss`` with weight 1), the image score as the maximum of the 16x16-average-pooled
map (ADer's evaluator ``pooling_ks=[16, 16]``, here ``model.score_pool``). ADer's 300-epoch
benchmark (``uniad_256_300e.py``) differs only in ``trainer.epochs=300`` (the decay then
comes after epoch 240).
"""

from __future__ import annotations

from typing import Any

from configs.base import ADDefaults
from util.config import Section, int_at_least, number_at_least, one_of


class UniADDefaults(ADDefaults):
    """UniAD on 256x256 images: frozen EfficientNet-B4 features, 4+4-layer neighbour-masked transformer."""

    # ADer's benchmark (configs/benchmark/*: use_adeval=True, evaluator.mode=ader) on float32 maps;
    # its pooling_ks=[16, 16] is model.score_pool
    PAPER_EVALUATOR = {"mode": "ader", "map_dtype": "float32"}

    def __init__(self) -> None:
        super().__init__()
        self.data.image_size = 256
        self.data.batch_size = 8
        self.model = Section(
            type="uniad",
            # the frozen backbone: a timm name with the weights' tag. ADer asks timm for
            # tf_efficientnet_b4 with pretrained=True and no tag, which loads timm's default
            # tag, ns_jft_in1k (tf_efficientnet_b4_ns-d6313a46.pth); the file its config also
            # names (tf_efficientnet_b4_aa-818f208c.pth, tag aa_in1k) is ignored when
            # pretrained=True. checkpoint=PATH loads a local timm file instead (offline);
            # calibrate_batches: BatchNorm statistics for a random backbone (neither of them).
            teacher=Section(
                name="tf_efficientnet_b4.ns_jft_in1k", pretrained=True, checkpoint=None, calibrate_batches=8
            ),
            hidden_dim=256,
            num_heads=8,
            num_encoder_layers=4,
            num_decoder_layers=4,
            dim_feedforward=1024,
            dropout=0.1,
            # masked window of the neighbour-masked attention, [h, w] cells of the stride-16 map
            # (a query cannot see keys within size // 2 rows and columns); None: ADer's
            # image_size // 32 (8 at 256; the UniAD paper used 7 at 224)
            neighbor_size=None,
            neighbor_mask=[True, True, True],  # masked: encoder, decoder's first and second attention
            jitter=Section(scale=20.0, prob=1.0),  # feature jitter in training (UniAD section 3.4)
            score_pool=16,  # image score: max of the map after this average filter (stride 1)
            checkpoint=None,  # full UniAD weights (ours, or ADer's {"net": ...}) to test or start from
            image_size=None,  # derived: data.image_size
        )
        self.loss = Section(type="feature_mse", weight=1.0)
        # ADer: lr = 1e-4 * batch / 8, i.e. 1e-4 at its batch of 8; our rule lr = base_lr * batch / 16
        # gives the same for every batch size with base_lr = 2e-4
        self.optim.base_lr = 2e-4
        self.optim.weight_decay = 1e-4
        self.trainer.epochs = 100

    def model_rules(self) -> dict[str, tuple[Any, str]]:
        """UniAD's ``model`` keys: transformer sizes, neighbour mask, jitter, score pooling."""
        from model.input_size import input_hw, valid_input_size
        from model.uniad.network import default_neighbor_size
        from model.uniad.transformer import neighbour_mask_problem

        size = self.data.image_size
        hw = input_hw(size) if valid_input_size(size) else None
        feature = (hw[0] // 16, hw[1] // 16) if hw else None
        m = self.model

        def neighbours_ok(v: object) -> bool:
            if v is None:
                return (
                    feature is None or neighbour_mask_problem(feature, default_neighbor_size(feature)) is None
                )
            pair = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                return False
            if feature is None:
                return all(isinstance(n, int) and n >= 1 for n in pair)
            return neighbour_mask_problem(feature, list(pair)) is None

        side = f"the {feature[0]}x{feature[1]} stride-16 map" if feature else "the stride-16 map"
        return {
            "model.hidden_dim": (
                lambda v: isinstance(v, int) and v >= 2 and v % 2 == 0,
                "an even integer (the position embedding gives half to rows, half to columns)",
            ),
            "model.num_heads": (
                lambda v: (
                    isinstance(v, int) and v >= 1 and isinstance(m.hidden_dim, int) and m.hidden_dim % v == 0
                ),
                "an integer >= 1 that divides model.hidden_dim",
            ),
            "model.num_encoder_layers": int_at_least(1),
            "model.num_decoder_layers": int_at_least(1),
            "model.dim_feedforward": int_at_least(1),
            "model.dropout": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "in [0, 1)"),
            "model.neighbor_size": (
                neighbours_ok,
                f"None, one integer or [h, w] >= 1 that leaves every query of {side} a visible key "
                "(2 * (size // 2) < side - 1 on at least one axis)",
            ),
            "model.neighbor_mask": (
                lambda v: isinstance(v, list | tuple) and len(v) == 3 and all(b in (True, False) for b in v),
                "three booleans: mask the encoder, the decoder's first and its second attention",
            ),
            "model.jitter.scale": number_at_least(0),
            "model.jitter.prob": (lambda v: isinstance(v, int | float) and 0 <= v <= 1, "in [0, 1]"),
            "model.score_pool": int_at_least(1),
            "model.teacher.pretrained": one_of(True, False),
            "model.teacher.calibrate_batches": int_at_least(0),
        }
