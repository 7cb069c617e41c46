"""Training and evaluation loop for feature-reconstruction anomaly detectors (MambaAD).

One run = one folder ``<output_dir>/<config>_<timestamp>/`` holding ``config.json``,
``log.txt``, TensorBoard events (``tb/``), ``ckpt.pth`` (everything needed to resume),
``net.pth`` (weights only), ``metrics.json`` and ``metrics.csv``. The reported result is
the last evaluation's, never the best epoch picked on the test set.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import DATASETS
from loss import LOSSES
from model.build import build_model
from trainer import EVALUATORS
from util.anomaly_map import anomaly_maps_and_scores
from util.checkpoint import atomic_save, load_file
from util.config import BaseConfig, config_to_dict, diff_configs, save_config
from util.logger import get_logger
from util.metrics import format_table


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; other names are passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a resumed run needs to continue identically."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ADTrainer:
    """Builds data, model, loss, optimiser and evaluator from a config; trains and tests."""

    def __init__(self, cfg: BaseConfig, mode: str = "train") -> None:
        self.cfg = cfg
        self.mode = mode
        self.device = resolve_device(cfg.device)
        self.run_dir = self._make_run_dir()
        self.log = get_logger(self.run_dir)
        self.log.info("run folder: %s", self.run_dir)
        self.log.info("device: %s", self.device)
        seed_everything(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)

        self.train_loader = self._build_loader("train") if mode == "train" else None
        self.test_loader = self._build_loader("test")
        self.model = self._build_model().to(self.device)
        self.loss_fn = LOSSES.build(cfg.loss.type, weight=cfg.loss.weight)
        options = {k: v for k, v in cfg.evaluator.items() if k not in ("type", "sigma")}
        self.evaluator = EVALUATORS.build(cfg.evaluator.type, **options)
        self.optimizer = self._build_optimizer() if mode == "train" else None
        self.scheduler = self._build_scheduler() if self.optimizer is not None else None
        self.start_epoch = 1
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        if mode == "train" and cfg.trainer.resume:
            self._resume(Path(cfg.trainer.resume))
        else:
            save_config(cfg, self.run_dir / "config.json")
            if mode == "train" and not cfg.model.checkpoint:
                self._calibrate_teacher()
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.global_step or None)

    # ------------------------------------------------------------------ building
    def _make_run_dir(self) -> Path:
        if self.mode == "train" and self.cfg.trainer.resume:
            run_dir = Path(self.cfg.trainer.resume)
            if not (run_dir / "ckpt.pth").is_file():
                raise FileNotFoundError(
                    f"trainer.resume={run_dir}: no ckpt.pth there; pass the run folder of an earlier training"
                )
            return run_dir
        stamp = time.strftime("%Y%m%d-%H%M%S")
        suffix = "" if self.mode == "train" else f"_{self.mode}"
        run_dir = Path(self.cfg.output_dir) / f"{self.cfg.name}{suffix}_{stamp}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = Path(self.cfg.output_dir) / f"{self.cfg.name}{suffix}_{stamp}-{n}"
        run_dir.mkdir(parents=True)
        return run_dir

    def _build_loader(self, split: str) -> DataLoader:
        cfg = self.cfg.data
        if getattr(cfg, "synthetic", False):
            from data.synthetic import MARKER, generate_demo_dataset

            if not (Path(cfg.root) / MARKER).is_file():
                self.log.info("generating the demo data set into %s (first run only)", cfg.root)
            generate_demo_dataset(cfg.root, **dict(cfg.synthetic_args.items()))
        dataset = DATASETS.build(
            cfg.type,
            root=cfg.root,
            split=split,
            cls_names=cfg.cls_names,
            image_size=cfg.image_size,
            meta_file=cfg.meta_file,
            log=self.log.info,
            # optional dataset features are passed only when set, so data sets without them still build
            **{k: getattr(cfg, k) for k in ("cache", "views") if getattr(cfg, k, None) is not None},
        )
        self.log.info("%s set: %d images, classes: %s", split, len(dataset), ", ".join(dataset.cls_names))
        train = split == "train"
        batch = cfg.batch_size if train else cfg.batch_size_test
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            drop_last=train and len(dataset) > batch,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.generator if train else None,
            persistent_workers=cfg.num_workers > 0,
        )

    def _build_model(self) -> torch.nn.Module:
        model = build_model(self.cfg, self.log)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        self.log.info(
            "model %s: %.2f M parameters (%.2f M trainable)", self.cfg.model.type, n_all / 1e6, n_train / 1e6
        )
        return model

    def _calibrate_teacher(self) -> None:
        """Give a random-weight teacher BatchNorm statistics of the training images."""
        calibrate = getattr(self.model, "calibrate_teacher", None)
        batches = self.cfg.model.teacher.calibrate_batches
        if calibrate is None or not batches:
            return
        images = (batch["img"].to(self.device) for batch in self.train_loader)
        used = calibrate(images, batches)
        if used:
            self.log.info("random teacher: BatchNorm statistics estimated on %d training batches", used)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.type != "adamw":
            raise ValueError(f"optim.type={o.type!r} is not supported; use 'adamw'")
        groups = self.model.parameter_groups(o.weight_decay)
        self.log.info(
            "optimizer AdamW lr %.6g (base %.6g x batch %d / 16)", o.lr, o.base_lr, self.cfg.data.batch_size
        )
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        sch = self.cfg.scheduler
        if sch.type != "step":
            raise ValueError(f"scheduler.type={sch.type!r} is not supported; use 'step'")
        self.log.info("lr x%g after epoch(s) %s", sch.gamma, ", ".join(str(m) for m in sch.milestones))
        return torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(sch.milestones), gamma=sch.gamma
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int) -> None:
        state = {
            "net": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "history": self.history,
            "rng": rng_state(),
            "loader_generator": self.generator.get_state(),
            "config": config_to_dict(self.cfg),
        }
        atomic_save(state, self.run_dir / "ckpt.pth")
        atomic_save(state["net"], self.run_dir / "net.pth")

    def _resume(self, run_dir: Path) -> None:
        state = load_file(run_dir / "ckpt.pth")
        changed = [
            k
            for k in diff_configs(state.get("config", {}), config_to_dict(self.cfg))
            if not k.startswith(("trainer.resume", "data.num_workers"))
        ]
        if changed:
            self.log.warning(
                "resuming with config values that differ from the saved run: %s", ", ".join(changed)
            )
        self.model.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["loader_generator"])
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.history = state.get("history", [])
        self.log.info("resumed %s at epoch %d (step %d)", run_dir, self.start_epoch, self.global_step)

    # ------------------------------------------------------------------ loops
    def train(self) -> dict[str, dict[str, float]] | None:
        """Train for ``trainer.epochs`` epochs, evaluating every ``trainer.test_every`` and at the end."""
        t = self.cfg.trainer
        results = None
        if self.start_epoch > t.epochs:
            self.log.info("run already finished (%d epochs); nothing to train", t.epochs)
        for epoch in range(self.start_epoch, t.epochs + 1):
            self._train_epoch(epoch)
            self.scheduler.step()
            if epoch % t.test_every == 0 or epoch == t.epochs:
                results = self.evaluate(epoch)
            if epoch % t.save_every == 0 or epoch == t.epochs:
                self._checkpoint(epoch)
        self.writer.close()
        return results

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        t = self.cfg.trainer
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{t.epochs}", leave=False, dynamic_ncols=True)
        losses = []
        for batch in bar:
            imgs = batch["img"].to(self.device, non_blocking=True)
            feats_t, feats_s = self.model(imgs)
            loss = self.loss_fn(feats_t, feats_s)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at epoch {epoch}, step {self.global_step}; images: "
                    f"{', '.join(batch['img_path'][:4])}... Try a lower optim.base_lr."
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            self.optimizer.step()
            self.global_step += 1
            losses.append(loss.item())
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            self.writer.add_scalar("train/loss", losses[-1], self.global_step)
            self.writer.add_scalar("train/lr", lr, self.global_step)
            if self.global_step % t.log_every == 0:
                self.log.info("epoch %d step %d loss %.5f lr %.3e", epoch, self.global_step, losses[-1], lr)
        self.log.info(
            "epoch %d/%d done: mean loss %.5f",
            epoch,
            t.epochs,
            float(np.mean(losses)) if losses else math.nan,
        )

    @torch.no_grad()
    def evaluate(self, epoch: int | None = None) -> dict[str, dict[str, float]]:
        """Score the test set, log the per-class table and write metrics files."""
        self.model.eval()
        self.evaluator.reset()
        size = self._image_size()
        for batch in tqdm(self.test_loader, desc="test", leave=False, dynamic_ncols=True):
            imgs = batch["img"].to(self.device, non_blocking=True)
            feats_t, feats_s = self.model(imgs)
            maps, scores = anomaly_maps_and_scores(feats_t, feats_s, size, self.cfg.evaluator.sigma)
            extra = {"sample_ids": batch["sample_id"]} if "sample_id" in batch else {}
            self.evaluator.update(
                maps, scores, batch["img_mask"], batch["anomaly"], batch["cls_name"], **extra
            )
        results = self.evaluator.compute()
        label = f"epoch {epoch}" if epoch is not None else "test"
        per_class = {k: v for k, v in results.items() if k != "mean"}
        self.log.info(
            "results (%s, %d images; values x100):\n%s",
            label,
            self.evaluator.num_samples,
            format_table(per_class),
        )
        step = self.global_step if epoch is not None else 0
        for cls, values in results.items():
            for name, value in values.items():
                tag = f"test/{name}" if cls == "mean" else f"test_{cls}/{name}"
                self.writer.add_scalar(tag, value * 100.0, step)
        self.history.append({"epoch": epoch, "step": step, "results": results})
        self._write_metrics()
        return results

    def _image_size(self) -> tuple[int, int]:
        size = self.cfg.data.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _write_metrics(self) -> None:
        """metrics.json: the final (latest) evaluation and the history; metrics.csv: every row."""
        final = self.history[-1]
        payload = {"final": final, "history": self.history, "note": "values are fractions in [0, 1]"}
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(self.run_dir / "metrics.json")
        names = list(next(iter(final["results"].values())).keys())
        with open(self.run_dir / "metrics.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "step", "class", *names])
            for entry in self.history:
                for cls, values in entry["results"].items():
                    writer.writerow(
                        [
                            entry["epoch"],
                            entry["step"],
                            cls,
                            *(f"{values.get(n, math.nan):.6f}" for n in names),
                        ]
                    )

    def test(self) -> dict[str, dict[str, float]]:
        """Evaluate the (loaded) model once."""
        results = self.evaluate(None)
        self.writer.close()
        return results
