"""What every method's config shares (``ADDefaults``): seed, data, loss, optimiser, schedule,
trainer and evaluator, with the MambaAD paper's values (section 4.1).

A method's defaults (``configs/defaults.py`` for MambaAD, ``configs/<method>_defaults.py``)
subclass it, fill in the ``model`` section and its checks; anything can be overridden on the
command line as ``section.key=value``.
"""

from __future__ import annotations

import os
from typing import Any

from util.config import BaseConfig, Section, check_values, int_at_least, number_at_least, one_of


class ADDefaults(BaseConfig):
    """What every method's config shares: seed, data, loss, optimiser, schedule, trainer, evaluator
    (the MambaAD paper's values; a method changes what its paper or ADer's benchmark uses). A
    method's config adds its ``model`` section and :meth:`model_rules`."""

    def __init__(self) -> None:
        super().__init__()
        self.seed = 42
        self.device = "auto"  # auto: cuda if available, else cpu
        self.output_dir = "runs"
        self.vis = (
            False  # True: per-class grids of the worst/best test images in RUN_DIR/vis/ at each evaluation
        )
        self.data = Section(
            type="DefaultAD",
            root="datasets/mvtec",
            meta_file="meta.json",
            cls_names=None,  # None: every class of the data set (multi-class setting)
            image_size=256,
            batch_size=16,
            batch_size_test=None,  # derived: batch_size
            num_workers=None,  # derived: min(4, CPU count)
            synthetic=False,  # True: generate the embedded demo data set into root first
            cache=None,  # None, "memory" or "npy": keep decoded, resized images between epochs
            cache_dir=None,  # folder for data.cache=npy; None = <root>/.cache
            views=None,  # multi-view data (Real-IAD): camera views to use, e.g. ["C1", "C2"]; None = all
            allow_absolute_paths=False,  # True: meta.json may name absolute paths (data kept outside root)
            # a meta.json 'validation' split: None = added to training (as the authors' loader),
            # "held_out" = scored apart from the test set for the evaluator (MVTec AD 2)
            validation=None,
            layout=None,  # the prepare_data.py --dataset name: missing data is explained with its download
        )
        # the method: its MODELS name and constructor arguments; each method's config fills it in
        self.model = Section(type=None, checkpoint=None, image_size=None)
        self.loss = Section(type="feature_mse", weight=5.0)
        self.optim = Section(
            type="adamw",
            base_lr=0.005,  # for a batch of 16; scaled linearly with data.batch_size
            lr=None,  # derived: base_lr * batch_size / 16
            betas=(0.9, 0.999),
            weight_decay=1e-4,
            # parameters without weight decay: "ader" = 1-D tensors and *.bias, as the authors' code
            # ran (A_logs and dt_projs_bias are decayed); "flagged" = also A_logs, Ds, dt_projs_bias
            # and every norm layer (what the model code's _no_weight_decay flags ask for)
            no_decay="ader",
        )
        self.scheduler = Section(type="step", decay_at=0.8, gamma=0.1, milestones=None)
        self.trainer = Section(
            type="ad_trainer",
            epochs=500,
            test_every=None,  # derived: epochs // 10 (the last epoch is always evaluated)
            grad_clip=5.0,
            log_every=50,  # iterations between log lines
            resume=None,  # RUN_DIR to continue (after a crash, SIGKILL, SIGTERM or Ctrl-C)
            resume_changes=False,  # True: a resume may change trainer.epochs/test_every/..., evaluator.*
            save_every=1,  # epochs between checkpoints (evaluated epochs are always saved)
            save_every_steps=0,  # also checkpoint every N optimiser steps inside an epoch; 0 = off
            keep_checkpoints=1,  # K > 1 also keeps the last K as checkpoints/ckpt_e<epoch>_b<batch>.pth
            amp="none",  # none, bf16 or fp16 (fp16 with a gradient scaler); the scan stays fp32
            accumulate=1,  # split each data.batch_size batch into K steps (same result, less memory)
            deterministic=False,  # deterministic kernels (exact resume on GPUs; slower)
            sync_bn=True,  # under torchrun: BatchNorm statistics of all ranks' images (ADer); False: per GPU
            fast_cuda=True,  # cuDNN autotuning on CUDA (off if deterministic)
            tf32=False,  # True: TF32 matmuls and convolutions on CUDA (faster; PyTorch's defaults otherwise)
            amp_eval=False,  # False: test maps in fp32 (no autocast, no TF32); True: under trainer.amp
            dist_timeout=3600,  # seconds a process may wait in a collective (rank 0 computes the metrics)
        )
        self.evaluator = Section(
            type="ad_evaluator",
            # "exact" (all thresholds), "ader" (ADer benchmark: ADEval 50-bin pixel metrics) or
            # "mambaad" (the MambaAD paper's evaluator: mask-derived image labels, 21-threshold pixel
            # F1-max, 100-step AU-PRO)
            mode="exact",
            map_dtype="float16",  # storage of the test maps: float16 or float32
            spill_dir=None,  # folder for maps moved to disk (None: a temporary folder)
            spill_mb=512,  # MB of maps kept in RAM (all classes) before the rest goes to disk; None: never
            plots=False,  # write ROC / PR / PRO curve PNGs per class into the run folder's curves/
            device="auto",  # exact metrics on cpu (numpy), cuda[:N] (torch) or auto (cuda when available)
            # protocol switches (docs/metrics.md, "Protocol switches"); the defaults leave the method's
            # maps and scores as they are
            metrics=None,  # None: the seven; may add P-mIoU-max, AUPIMO, SegF1
            image_score="model",  # model (the method's own), max, topk_mean, pooled_max
            image_score_k=1.0,  # topk_mean: percent of the pixels
            image_score_pool=16,  # pooled_max: average-filter kernel size
            mask_threshold=0.5,  # masks > t (after the resize to evaluator.resolution)
            smooth_sigma=None,  # a Gaussian blur added to the method's maps (None: none)
            smooth_taps=None,  # its kernel width (odd; None: scipy's 2 * int(4 sigma + 0.5) + 1)
            resolution=None,  # maps and masks resized to this side or [h, w] (None: data.image_size)
            aupro_limit=0.3,  # FPR where the AU-PRO area ends
            aupro_steps=None,  # mode=mambaad only: thresholds of its AU-PRO sweep (None: 100)
            # SegF1's threshold: a number; mean + 3 std of the pixels of the held-out "validation"
            # images (MVTec AD 2, data.validation=held_out) or of the "normal_test" images
            segf1_threshold="normal_test",
            also_exact=True,  # mode ader / mambaad: also record the exact table
        )

    LIST_OR_NUMBER = ("data.image_size",)  # one side, or [height, width]
    # the evaluator keys with which the method's paper (or ADer's benchmark for it) scored; a paper
    # config applies them with use_paper_protocol (docs/metrics.md, "Protocol switches")
    PAPER_EVALUATOR: dict[str, Any] = {}

    def use_paper_protocol(self) -> None:
        """Score as the method's authors did: the evaluator keys of :attr:`PAPER_EVALUATOR`."""
        for key, value in self.PAPER_EVALUATOR.items():
            setattr(self.evaluator, key, value)

    def derive(self) -> None:
        """Recompute values that depend on others (called after command-line overrides)."""
        super().derive()
        if isinstance(self.data.cls_names, str):  # data.cls_names=wood or =wood,weave on the command line
            self.data.cls_names = [c.strip() for c in self.data.cls_names.split(",") if c.strip()]
        self.set_derived("data.batch_size_test", self.data.batch_size)
        self.set_derived("data.num_workers", min(4, os.cpu_count() or 1))
        self.set_derived("model.image_size", self.data.image_size)
        self.set_derived("optim.lr", self.optim.base_lr * self.data.batch_size / 16)
        self.set_derived("scheduler.milestones", [round(self.scheduler.decay_at * self.trainer.epochs)])
        self.set_derived("trainer.test_every", max(1, self.trainer.epochs // 10))

    def validate(self) -> None:
        """Reject values that would fail later (or silently do nothing) before any work starts."""
        check_values(self, {**self.common_rules(), **self.model_rules()})

    def common_rules(self) -> dict[str, tuple[Any, str]]:
        """Rules for the sections every method shares (seed, trainer, data, optim, loss, ...)."""
        from evaluation.metrics import METRIC_MODES
        from evaluation.metrics_exact import METRIC_NAMES
        from evaluation.metrics_extra import EXTRA_METRICS, SEGF1_THRESHOLDS
        from evaluation.protocol import IMAGE_SCORES
        from model.input_size import RULE as INPUT_SIZE_RULE
        from model.input_size import valid_input_size

        SELECTABLE = (*METRIC_NAMES, *EXTRA_METRICS)

        return {
            "seed": int_at_least(0),
            "trainer.epochs": int_at_least(1),
            "trainer.test_every": int_at_least(1),
            "trainer.save_every": int_at_least(1),
            "trainer.save_every_steps": int_at_least(0),
            "trainer.keep_checkpoints": int_at_least(1),
            "trainer.log_every": int_at_least(1),
            "trainer.accumulate": int_at_least(1),
            "trainer.grad_clip": number_at_least(0, allow_none=True),
            "trainer.amp": one_of("none", "bf16", "fp16"),
            "trainer.fast_cuda": one_of(True, False),
            "trainer.tf32": one_of(True, False),
            "trainer.sync_bn": one_of(True, False),
            "trainer.amp_eval": one_of(True, False),
            "trainer.dist_timeout": number_at_least(1),
            "data.batch_size": int_at_least(1),
            "data.batch_size_test": int_at_least(1),
            "data.num_workers": int_at_least(0),
            "data.image_size": (valid_input_size, INPUT_SIZE_RULE),
            "data.validation": one_of(None, "held_out"),
            "optim.base_lr": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
            "optim.lr": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
            "optim.betas": (
                lambda v: (
                    isinstance(v, list | tuple)
                    and len(v) == 2
                    and all(isinstance(b, int | float) and 0 <= b < 1 for b in v)
                ),
                "two numbers in [0, 1), e.g. [0.9, 0.999]",
            ),
            "loss.weight": (lambda v: isinstance(v, int | float) and v > 0, "a positive number"),
            "scheduler.gamma": (
                lambda v: isinstance(v, int | float) and 0 < v <= 1,
                "in (0, 1]: the factor the learning rate is multiplied by at each milestone",
            ),
            "scheduler.decay_at": (
                lambda v: isinstance(v, int | float) and 0 < v <= 1,
                "in (0, 1]: the fraction of trainer.epochs after which the learning rate drops",
            ),
            "evaluator.mode": one_of(*METRIC_MODES),
            "evaluator.map_dtype": one_of("float16", "float32"),
            "evaluator.image_score": one_of(*IMAGE_SCORES),
            "evaluator.image_score_k": (
                lambda v: isinstance(v, int | float) and 0 < v <= 100,
                "a percentage in (0, 100]",
            ),
            "evaluator.image_score_pool": int_at_least(1),
            "evaluator.mask_threshold": (lambda v: isinstance(v, int | float) and 0 <= v < 1, "in [0, 1)"),
            "evaluator.smooth_sigma": (
                lambda v: v is None or (isinstance(v, int | float) and v > 0),
                "None or a positive number",
            ),
            "evaluator.smooth_taps": (
                lambda v: v is None or (isinstance(v, int) and v >= 1 and v % 2 == 1),
                "None or an odd integer >= 1",
            ),
            "evaluator.resolution": (
                lambda v: v is None or _sides_ok(v),
                "None, a side >= 1 or [height, width]",
            ),
            "evaluator.aupro_limit": (lambda v: isinstance(v, int | float) and 0 < v <= 1, "in (0, 1]"),
            "evaluator.aupro_steps": (
                lambda v: v is None or (isinstance(v, int) and v >= 2 and self.evaluator.mode == "mambaad"),
                "None, or an integer >= 2 with evaluator.mode=mambaad",
            ),
            "evaluator.metrics": (
                lambda v: v is None or (isinstance(v, list | tuple) and set(v) <= set(SELECTABLE)),
                f"None or a list of {', '.join(SELECTABLE)}",
            ),
            "evaluator.segf1_threshold": (
                lambda v: isinstance(v, int | float) or v in SEGF1_THRESHOLDS,
                f"a number or {', '.join(SEGF1_THRESHOLDS)}",
            ),
            "evaluator.also_exact": one_of(True, False),
            "optim.weight_decay": number_at_least(0),
            "optim.no_decay": one_of("ader", "flagged"),
        }

    def model_rules(self) -> dict[str, tuple[Any, str]]:
        """Rules for the ``model`` section; each method's config brings its own."""
        return {}

    def use_demo_data(self) -> None:
        """The embedded demo data set (generated into ``datasets/demo`` on first use) at 64x64,
        batch 8, with a random teacher: what every method's demo config shares, so that the demos
        of all methods train on the same images."""
        self.data.root = "datasets/demo"
        self.data.synthetic = True
        self.data.synthetic_args = Section(image_size=128, n_train=60, n_test_good=15, n_test_bad=15, seed=0)
        self.data.image_size = 64
        self.data.batch_size = 8
        self.data.num_workers = 0
        self.model.teacher.pretrained = False


def _sides_ok(size: Any) -> bool:
    """One side or ``[height, width]``, integers >= 1."""
    sides = size if isinstance(size, list | tuple) and len(size) == 2 else [size]
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sides)
