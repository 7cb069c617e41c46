"""Default settings shared by every MambaAD experiment: the paper's setup (section 4.1).

Subclasses in the ``configs/mambaad_*.py`` files change the data set and a few values;
anything can be overridden on the command line as ``section.key=value``.
"""

from __future__ import annotations

from typing import Any

from configs.base import ADDefaults
from util.config import Section, number_at_least, one_of


class MambaADDefaults(ADDefaults):
    """MambaAD on 256x256 images: ResNet34 teacher, depths [3,4,6,3], Hilbert scan, 8 directions."""

    # the MambaAD paper's tables: its configs/mambaad/*.py ran ADer's evaluator with ADEval off and
    # max_step_aupro=100 (evaluator.mode=mambaad) on float32 maps
    PAPER_EVALUATOR = {"mode": "mambaad", "map_dtype": "float32"}

    def __init__(self) -> None:
        super().__init__()
        self.model = Section(
            type="mambaad",
            # name: timm model and pretrained tag; resnet34.bt_in1k is the authors' file
            # resnet34-43635321.pth (plain "resnet34" would be timm's a1_in1k, other weights).
            # pretrained=True downloads timm's ImageNet weights (online machines only);
            # checkpoint=PATH loads a local timm/torchvision file instead.
            # calibrate_batches: a random teacher (neither of the above) gets BatchNorm statistics
            # from this many training batches before training; 0 disables it.
            teacher=Section(name="resnet34.bt_in1k", pretrained=True, checkpoint=None, calibrate_batches=8),
            depths=[3, 4, 6, 3],
            # grouped: split the channels into K groups, each scanned in one direction only
            # (our design after MMAD's "group scanning": about K times less scan work and memory)
            scan=Section(method="hilbert", directions=8, backend="auto", grouped=False),
            d_state=16,
            drop_path=0.2,
            # LSS module design (paper Table 4): blocks = HSS blocks per LSS module (None: 3 if the
            # stage depth is a multiple of 3, else 2); kernels = depth-wise kernel of each local
            # branch; pointwise = 1x1 convs around each depth-wise conv; residual = "+ x" skip.
            lss=Section(blocks=None, kernels=[5, 7], pointwise=True, residual=True),
            # teacher -> decoder: "hfpn" (the paper's Half-FPN) or "dilated_mamba" (our fuser after
            # MMAD: one HSS block per dilation rate at 1/16 scale; each rate < image_size / 16)
            bottleneck=Section(type="hfpn", dilations=[1, 2], method="sweep", directions=4),
            sigma=4.0,  # Gaussian blur of the anomaly maps
            checkpoint=None,  # full MambaAD weights (net.pth / ckpt.pth) to test or start from
            image_size=None,  # derived: data.image_size
        )

    def model_rules(self) -> dict[str, tuple[Any, str]]:
        """MambaAD's ``model`` keys: depths, scan, LSS, bottleneck, sigma."""
        from model.input_size import input_hw, valid_input_size
        from model.mambaad.scan_orders import NUM_DIRECTIONS, SCAN_METHODS
        from model.ops.selective_scan import BACKENDS

        size = self.data.image_size
        side = min(input_hw(size)) // 16 if valid_input_size(size) else 0  # of the 1/16-scale map
        methods = str(self.model.scan.method).split("+")
        blocks = self.model.lss.blocks

        def stage_ok(depth: object) -> bool:
            if not isinstance(depth, int) or depth < 1:
                return False
            return depth % blocks == 0 if blocks else depth % 2 == 0 or depth % 3 == 0

        return {
            "model.depths": (
                lambda v: isinstance(v, list | tuple) and len(v) == 4 and all(map(stage_ok, v)),
                f"four multiples of model.lss.blocks={blocks}"
                if blocks
                else "four multiples of 2 or 3 (HSS blocks per LSS module), e.g. [3,4,6,3]",
            ),
            "model.scan.directions": one_of(*NUM_DIRECTIONS),
            "model.scan.method": (
                lambda v: all(m in SCAN_METHODS for m in methods),
                f"one of {', '.join(SCAN_METHODS)} or two joined by '+' (e.g. zigzag+hilbert)",
            ),
            "model.drop_path": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "in [0, 1)"),
            "model.scan.backend": one_of(*BACKENDS),
            "model.sigma": number_at_least(0),
            "model.scan.grouped": one_of(True, False),
            "model.bottleneck.type": one_of("hfpn", "dilated_mamba"),
            "model.bottleneck.directions": one_of(*NUM_DIRECTIONS),
            "model.bottleneck.method": one_of(*SCAN_METHODS),
            "model.bottleneck.dilations": (
                lambda v: (
                    isinstance(v, list | tuple)
                    and len(v) > 0
                    and all(isinstance(r, int) and r >= 1 and (r == 1 or r < side or not side) for r in v)
                ),
                f"a non-empty list of integer rates, each 1 or smaller than the "
                f"{side}-pixel side of the 1/16-scale map (data.image_size / 16)",
            ),
        }
