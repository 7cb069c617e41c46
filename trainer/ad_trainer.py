"""Training and evaluation loop for feature-reconstruction anomaly detectors (MambaAD).

One run = one folder ``<output_dir>/<config>_<timestamp>/`` holding ``config.json``,
``log.txt``, TensorBoard events (``tb/``), ``ckpt.pth`` (everything needed to resume),
``net.pth`` (weights only), ``metrics.json`` and ``metrics.csv``. The reported result is
the last evaluation's, never the best epoch picked on the test set.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from data import DATASETS
from loss import LOSSES
from model.build import build_model
from model.ops.selective_scan import prepare_cpu
from trainer import EVALUATORS
from trainer.run_folder import RunLock, new_run_dir, write_status
from util.anomaly_map import anomaly_maps_and_scores
from util.checkpoint import atomic_save, load_file, remove_partial_writes, save_rotating
from util.config import BaseConfig, ConfigError, config_to_dict, diff_configs, flat_keys, save_config
from util.distributed import (
    EpochShardSampler,
    ShardSampler,
    all_gather_padded,
    any_rank,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    steps_for_all,
    wrap_ddp,
)
from util.logger import get_logger
from util.metrics import format_rows, format_table, json_ready, max_over_evaluations
from util.progress import Progress
from util.signals import StopRequest, TrainingInterruptedError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_determinism() -> None:
    """Deterministic kernels where PyTorch has them (warns where it has none); no cuDNN autotuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


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


class _NullWriter:
    """Stands in for TensorBoard's writer on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        """Discard the value."""

    def close(self) -> None:
        """Nothing to close."""


_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# config keys that may differ on resume: not at all part of the run / changeable with trainer.resume_changes
IGNORED_ON_RESUME = ("trainer.resume", "data.num_workers", "device", "output_dir", "config_file")
SAFE_ON_RESUME = (
    "trainer.epochs",
    "trainer.test_every",
    "trainer.save_every",
    "trainer.save_every_steps",
    "trainer.keep_checkpoints",
    "trainer.log_every",
    "data.batch_size_test",
    "data.cache",
    "evaluator.",
    "vis",
)
_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


class ADTrainer:
    """Builds data, model, loss, optimiser and evaluator from a config; trains and tests.

    Runs as one process or as one rank of a ``torchrun`` job: rank 0 alone writes the run
    folder (logs, TensorBoard, checkpoints, metrics); every rank trains on its shard of each
    epoch and scores its shard of the test set, whose maps are gathered on rank 0.
    """

    def __init__(self, cfg: BaseConfig, mode: str = "train") -> None:
        self.cfg = cfg
        self.mode = mode
        t = cfg.trainer
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        if self.device.type == "cpu":
            # from the first operation on, not from the first scan: runs stay bit-identical
            prepare_cpu()
        if t.deterministic:
            enable_determinism()
        self.resuming = mode == "train" and bool(t.resume)
        self.lock = RunLock(t.resume) if self.resuming and self.dist.is_main else None
        if self.lock is not None:
            self.lock.acquire()  # before anything is read: another process may be writing there
        self.run_dir = broadcast_object(self._make_run_dir() if self.dist.is_main else None, self.dist)
        if self.dist.is_main:
            if self.lock is None and mode == "train":
                self.lock = RunLock(self.run_dir).acquire()
            self.log = get_logger(self.run_dir)
        else:
            self.log = get_logger(None, name=f"mambaad.rank{self.dist.rank}")
            self.log.setLevel(logging.ERROR)  # rank 0 reports; the others only on failure
        try:
            self._set_up()
        except BaseException as err:
            self._set_up_failed(err)
            raise

    def _set_up(self) -> None:
        """Everything after the run folder exists: data, model, optimiser, evaluator, resume."""
        cfg, t, mode = self.cfg, self.cfg.trainer, self.mode
        if self.resuming:
            self._check_resume_config(Path(t.resume))
        self.log.info("run folder: %s", self.run_dir)
        self.log.info(
            "device: %s%s",
            self.device,
            f" x {self.dist.world_size} processes (torchrun)" if self.dist.distributed else "",
        )
        self.micro_batch = self._micro_batch()
        seed_everything(cfg.seed)  # identical model initialisation on every rank
        self.train_loader = self._build_loader("train") if mode == "train" else None
        self.test_loader = self._build_loader("test")
        self.model = self._build_model().to(self.device)
        self.loss_fn = LOSSES.build(cfg.loss.type, weight=cfg.loss.weight)
        options = {k: v for k, v in cfg.evaluator.items() if k not in ("type", "sigma")}
        self.evaluator = EVALUATORS.build(cfg.evaluator.type, **options)
        self.optimizer = self._build_optimizer() if mode == "train" else None
        self.scheduler = self._build_scheduler() if self.optimizer is not None else None
        self.amp_dtype = _AMP_DTYPES[t.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.start_epoch = 1
        self.skip_batches = 0
        self.eval_pending = False
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.stop = StopRequest()
        seed_everything(cfg.seed + self.dist.rank)  # per-rank randomness (drop-path) from here on
        if mode == "train" and t.resume:
            self._resume(Path(t.resume))
        else:
            if self.dist.is_main:
                save_config(cfg, self.run_dir / "config.json")
            if mode == "train" and not cfg.model.checkpoint:
                self._calibrate_teacher()
        self.net = self._wrap_ddp(self.model)
        self.writer: Any = _NullWriter()
        if self.dist.is_main:
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.global_step or None)

    def _set_up_failed(self, err: BaseException) -> None:
        """A new run whose set-up failed leaves no folder; a resumed one is marked as failed."""
        if not self.dist.is_main:
            return
        if self.resuming:
            write_status(self.run_dir, "failed", error=f"{type(err).__name__}: {err}")
            self.lock.release()
            return
        for handler in list(self.log.handlers):
            if isinstance(handler, logging.FileHandler):
                self.log.removeHandler(handler)
                handler.close()
        if self.lock is not None:
            self.lock.release()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ building
    def _micro_batch(self) -> int:
        """Per-rank batch: the global ``data.batch_size`` split over ranks and accumulation steps."""
        total, world, acc = self.cfg.data.batch_size, self.dist.world_size, int(self.cfg.trainer.accumulate)
        if total % (world * acc):
            raise ConfigError(
                f"data.batch_size={total} must be divisible by {world} process(es) x "
                f"trainer.accumulate={acc}; choose a batch size that is a multiple of {world * acc}"
            )
        return total // (world * acc)

    def _make_run_dir(self) -> Path:
        if self.resuming:
            run_dir = Path(self.cfg.trainer.resume)
            if not (run_dir / "ckpt.pth").is_file():
                raise ConfigError(
                    f"trainer.resume={run_dir}: no ckpt.pth there; pass the run folder of an earlier training"
                )
            return run_dir
        suffix = "" if self.mode == "train" else f"_{self.mode}"
        return new_run_dir(self.cfg.output_dir, f"{self.cfg.name}{suffix}")

    def _check_resume_config(self, run_dir: Path) -> None:
        """Refuse a resume whose effective config differs from the saved run's.

        With ``trainer.resume_changes=True`` the keys in :data:`SAFE_ON_RESUME` may change
        (recorded in ``resume_changes.json`` and ``config.json``); values derived from them
        keep the saved run's (the checkpoint's scheduler holds those).
        """
        path = run_dir / "config.json"
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        now = config_to_dict(self.cfg)
        old, new = flat_keys(saved), flat_keys(now)
        changed = [
            k
            for k in diff_configs(saved, now)
            if not k.startswith(IGNORED_ON_RESUME)
            # a key added to (or removed from) the project since the run was saved, not set by the user
            and not ((k not in old or k not in new) and k not in self.cfg.overridden)
        ]
        if not changed:
            return
        listing = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        explicit = [k for k in changed if k in self.cfg.overridden]
        unsafe = [k for k in explicit if not k.startswith(SAFE_ON_RESUME)]
        if not self.cfg.trainer.resume_changes or unsafe:
            raise ConfigError(
                f"trainer.resume={run_dir}: the config differs from the saved run ({listing}). Resume with "
                f"the overrides of the original run (see {path}); only "
                f"{', '.join(k + '*' if k.endswith('.') else k for k in SAFE_ON_RESUME)} may change, "
                f"with trainer.resume_changes=True" + (f" ({', '.join(unsafe)} cannot)" if unsafe else "")
            )
        for key in changed:
            if key not in explicit:  # derived from a changed key: the checkpoint keeps the saved value
                parent = self.cfg
                *sections, leaf = key.split(".")
                for name in sections:
                    parent = getattr(parent, name)
                value = old.get(key)
                setattr(parent, leaf, tuple(value) if isinstance(getattr(parent, leaf), tuple) else value)
        applied = {k: [old.get(k), new.get(k)] for k in explicit}
        if self.dist.is_main:
            record = run_dir / "resume_changes.json"
            history = json.loads(record.read_text()) if record.is_file() else []
            history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": applied})
            record.write_text(json.dumps(history, indent=2, default=str) + "\n")
            save_config(self.cfg, path)
        self.log.warning(
            "resuming with changed config values (recorded in resume_changes.json): %s",
            ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in applied.items()),
        )

    def _build_loader(self, split: str) -> DataLoader:
        cfg = self.cfg.data
        if getattr(cfg, "synthetic", False):
            from data.synthetic import MARKER, generate_demo_dataset

            if self.dist.is_main:
                if not (Path(cfg.root) / MARKER).is_file():
                    self.log.info("generating the demo data set into %s (first run only)", cfg.root)
                generate_demo_dataset(cfg.root, **dict(cfg.synthetic_args.items()))
            barrier(self.dist)
        dataset = DATASETS.build(
            cfg.type,
            root=cfg.root,
            split=split,
            cls_names=cfg.cls_names,
            image_size=cfg.image_size,
            meta_file=cfg.meta_file,
            log=self.log.info,
            # optional dataset features are passed only when set, so data sets without them still build
            **{
                k: getattr(cfg, k)
                for k in ("cache", "cache_dir", "views", "allow_absolute_paths")
                if getattr(cfg, k, None) not in (None, False)
            },
        )
        self.log.info("%s set: %d images, classes: %s", split, len(dataset), ", ".join(dataset.cls_names))
        rank, world = self.dist.rank, self.dist.world_size
        if split == "train":
            batch = self.micro_batch
            sampler: Any = EpochShardSampler(len(dataset), self.cfg.seed, rank, world)
            drop_last = len(sampler) > batch
        else:
            batch = max(1, math.ceil(cfg.batch_size_test / world))
            sampler, drop_last = ShardSampler(len(dataset), rank, world), False
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # a loader of its own draws worker seeds, so iterating it leaves the global RNG alone
            generator=torch.Generator().manual_seed(self.cfg.seed + rank),
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

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over ranks (rank 0's weights win), optionally with SyncBatchNorm."""
        if not self.dist.distributed:
            return model
        if self.cfg.trainer.sync_bn:
            if self.device.type != "cuda":
                raise ValueError(
                    "trainer.sync_bn=True needs GPUs (NCCL); PyTorch's SyncBatchNorm has no CPU path"
                )
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        return wrap_ddp(model, self.dist)

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
        groups = self.model.parameter_groups(o.weight_decay, no_decay=o.no_decay)
        t = self.cfg.trainer
        self.log.info(
            "optimizer AdamW lr %.6g (base %.6g x batch %d / 16), weight decay %g (no_decay=%s); "
            "%d process(es) x %d image(s) x %d accumulation step(s)",
            o.lr,
            o.base_lr,
            self.cfg.data.batch_size,
            o.weight_decay,
            o.no_decay,
            self.dist.world_size,
            self.micro_batch,
            t.accumulate,
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

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int, batches_done: int = 0, eval_pending: bool = False) -> None:
        """Save everything a resume needs; ``epoch`` = last completed epoch (collective call)."""
        rngs = gather_objects(rng_state(), self.dist)
        if not self.dist.is_main:
            return
        state = {
            "net": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "batches_done": batches_done,
            "eval_pending": eval_pending,
            "global_step": self.global_step,
            "history": self.history,
            "rng": rngs,
            "world_size": self.dist.world_size,
            "config": config_to_dict(self.cfg),
        }
        tag = f"e{epoch:05d}_b{batches_done:07d}"
        save_rotating(state, self.run_dir, tag, int(self.cfg.trainer.keep_checkpoints))
        atomic_save(state["net"], self.run_dir / "net.pth")

    def _resume(self, run_dir: Path) -> None:
        if self.dist.is_main:
            for path in remove_partial_writes(run_dir):
                self.log.info("removed %s, left by an interrupted write", path.name)
        barrier(self.dist)
        state = load_file(run_dir / "ckpt.pth")
        self.model.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            self.log.warning(
                "the checkpoint was saved by %d process(es), this run has %d: random streams restart "
                "from the seed, so the result will not equal an uninterrupted run exactly",
                len(rngs),
                self.dist.world_size,
            )
        done = int(state.get("batches_done", 0))
        self.start_epoch = state["epoch"] + 1
        self.skip_batches = done
        self.eval_pending = bool(state.get("eval_pending", False))
        self.global_step = state["global_step"]
        self.history = state.get("history", [])
        where = f"epoch {self.start_epoch}" + (f" after {done} batches" if done else "")
        if self.eval_pending:
            where = f"the evaluation of epoch {state['epoch']}"
        self.log.info("resumed %s at %s (step %d)", run_dir, where, self.global_step)

    # ------------------------------------------------------------------ loops
    def train(self) -> dict[str, dict[str, float]] | None:
        """Train for ``trainer.epochs`` epochs, evaluating every ``trainer.test_every`` and at the end.

        SIGTERM or a first Ctrl-C saves a checkpoint at the next step and raises
        :class:`TrainingInterruptedError`; ``trainer.resume=RUN_DIR`` continues from it.
        """
        with self._status():
            return self._train()

    @contextlib.contextmanager
    def _status(self) -> Any:
        """Keep ``status.json`` true: running, then finished, interrupted or failed (with the error)."""
        if self.dist.is_main:
            write_status(self.run_dir, "running", mode=self.mode)
        try:
            yield
        except TrainingInterruptedError as stop:
            if self.dist.is_main:
                write_status(self.run_dir, "interrupted", mode=self.mode, message=str(stop))
            raise
        except BaseException as err:
            if self.dist.is_main:
                state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                write_status(self.run_dir, state, mode=self.mode, error=f"{type(err).__name__}: {err}")
            raise
        else:
            if self.dist.is_main:
                write_status(self.run_dir, "finished", mode=self.mode)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> dict[str, dict[str, float]] | None:
        t = self.cfg.trainer
        results = None
        if self.start_epoch > t.epochs and not self.eval_pending:
            self.log.info("run already finished (%d epochs); nothing to train", t.epochs)
        with self.stop:
            if self.eval_pending:
                results = self._evaluate_and_save(self.start_epoch - 1)
            for epoch in range(self.start_epoch, t.epochs + 1):
                self._train_epoch(epoch, self.skip_batches)
                self.skip_batches = 0
                self.scheduler.step()
                if epoch % t.test_every == 0 or epoch == t.epochs:
                    self._checkpoint(epoch, eval_pending=True)
                    results = self._evaluate_and_save(epoch)
                elif epoch % t.save_every == 0:
                    self._checkpoint(epoch)
        self.writer.close()
        return results

    def _evaluate_and_save(self, epoch: int) -> dict[str, dict[str, float]] | None:
        results = self.evaluate(epoch)
        self._checkpoint(epoch)
        return results

    def _stop_now(self, epoch: int, batches_done: int) -> None:
        """Honour a stop request: checkpoint (mid-epoch position included) and raise."""
        self._checkpoint(epoch - 1, batches_done=batches_done)
        name = self.stop.name or "stop request"
        raise TrainingInterruptedError(
            f"{name} received: saved a checkpoint at epoch {epoch}, step {self.global_step} "
            f"in {self.run_dir}; continue with trainer.resume={self.run_dir}",
            self.stop.signal or 15,
        )

    def _train_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.net.train()
        t = self.cfg.trainer
        acc = int(t.accumulate)
        self.train_loader.sampler.set_epoch(epoch, skip_batches * self.micro_batch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = Progress(
            self.train_loader, f"epoch {epoch}/{t.epochs}", self.log.info, enabled=self.dist.is_main
        )
        n_batches = len(self.train_loader) + skip_batches
        losses = []
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar, start=skip_batches):
            last_micro = (i + 1) % acc == 0 or i + 1 == n_batches
            loss = self._micro_step(batch, epoch, sync=last_micro, scale=1.0 / acc)
            losses.append(loss)
            if not last_micro:
                continue
            self.scaler.unscale_(self.optimizer)
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self.writer.add_scalar("train/loss", loss, self.global_step)
            self.writer.add_scalar("train/lr", lr, self.global_step)
            if self.global_step % t.log_every == 0:
                self.log.info("epoch %d step %d loss %.5f lr %.3e", epoch, self.global_step, loss, lr)
            if any_rank([self.stop.signal is not None], self.dist)[0]:
                self._stop_now(epoch, i + 1)
            if t.save_every_steps and self.global_step % t.save_every_steps == 0 and i + 1 < n_batches:
                self._checkpoint(epoch - 1, batches_done=i + 1)
        self.log.info(
            "epoch %d/%d done: mean loss %.5f",
            epoch,
            t.epochs,
            float(np.mean(losses)) if losses else math.nan,
        )

    def _micro_step(self, batch: dict[str, Any], epoch: int, sync: bool, scale: float) -> float:
        """Forward and backward of one (micro-)batch; gradients are all-reduced only when ``sync``."""
        imgs = batch["img"].to(self.device, non_blocking=True)
        no_sync = getattr(self.net, "no_sync", None)
        context = no_sync() if no_sync is not None and not sync else contextlib.nullcontext()
        try:
            with context:
                with self._autocast():
                    feats_t, feats_s = self.net(imgs)
                    loss = self.loss_fn(feats_t, feats_s)
                bad_here = not bool(torch.isfinite(loss))
                if any_rank([bad_here], self.dist)[0]:
                    where = ", ".join(batch["img_path"][:4]) if bad_here else "a batch of another process"
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item() if bad_here else 'elsewhere'}) at epoch {epoch}, "
                        f"step {self.global_step + 1}; images: {where}. Lower optim.base_lr"
                        + (
                            ", or use trainer.amp=bf16 / none instead of fp16"
                            if self.cfg.trainer.amp == "fp16"
                            else ""
                        )
                        + self._last_good_weights()
                    )
                self.scaler.scale(loss * scale).backward()
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or any(m in str(err) for m in _OOM_MARKERS):
                raise RuntimeError(
                    f"out of memory at epoch {epoch} with {imgs.shape[0]} image(s) per step on "
                    f"{self.device}: lower data.batch_size, or keep it and set trainer.accumulate=K to "
                    f"split each batch into K steps (data.batch_size must be divisible by processes x K); "
                    f"or trainer.amp=bf16"
                ) from err
            raise
        return float(loss.item())

    def _last_good_weights(self) -> str:
        if (self.run_dir / "ckpt.pth").is_file():
            return f"; the last good weights are in {self.run_dir / 'ckpt.pth'}."
        return "; no checkpoint has been written yet (the failure came before the first save)."

    @torch.no_grad()
    def evaluate(self, epoch: int | None = None) -> dict[str, dict[str, float]] | None:
        """Score the test set; on rank 0 log the per-class table, write metrics files and return them.

        Every rank scores its shard; maps, masks and labels are gathered on rank 0 batch by
        batch (no padding reaches the evaluator), which checks that each image came exactly once.
        """
        self.net.eval()
        self.evaluator.reset()
        size = self._image_size()
        loader = self.test_loader
        shard = loader.sampler.indices
        steps = steps_for_all(len(loader.dataset), loader.batch_size, self.dist.world_size)
        batches = iter(loader)
        seen: list[int] = []
        for step in Progress(range(steps), "test", self.log.info, enabled=self.dist.is_main):
            batch = next(batches, None)
            if batch is not None:
                imgs = batch["img"].to(self.device, non_blocking=True)
                with self._autocast():
                    feats_t, feats_s = self.net(imgs)
                feats_t = [f.float() for f in feats_t]
                feats_s = [f.float() for f in feats_s]
                maps, scores = anomaly_maps_and_scores(feats_t, feats_s, size, self.cfg.evaluator.sigma)
                masks = batch["img_mask"].reshape(maps.shape).to(self.device) > 0.5
                labels = torch.as_tensor(batch["anomaly"], device=self.device)
                start = step * loader.batch_size
                index = torch.as_tensor(shard[start : start + maps.shape[0]], device=self.device)
                info = {k: list(batch[k]) for k in ("cls_name", "img_path", "sample_id") if k in batch}
            else:
                maps = torch.zeros((0, *size), device=self.device)
                scores = torch.zeros(0, device=self.device)
                masks = torch.zeros((0, *size), dtype=torch.bool, device=self.device)
                labels = torch.zeros(0, dtype=torch.long, device=self.device)
                index = torch.zeros(0, dtype=torch.long, device=self.device)
                info = {}
            parts = [
                all_gather_padded(x, loader.batch_size, self.dist)
                for x in (maps, scores, masks.to(torch.uint8), labels, index)
            ]
            infos = gather_objects(info, self.dist)
            if any_rank([self.stop.signal is not None], self.dist)[0]:
                raise TrainingInterruptedError(
                    f"{self.stop.name} received during evaluation; the last checkpoint of {self.run_dir} "
                    f"re-runs it on resume",
                    self.stop.signal or 15,
                )
            if not self.dist.is_main:
                continue
            for r_maps, r_scores, r_masks, r_labels, r_index, r_info in zip(*parts, infos, strict=True):
                if not len(r_index):
                    continue
                seen.extend(r_index.tolist())
                self.evaluator.update(
                    r_maps.cpu(),
                    r_scores.cpu(),
                    r_masks.cpu().bool(),
                    r_labels.cpu(),
                    r_info["cls_name"],
                    sample_ids=r_info.get("sample_id"),
                    img_paths=r_info.get("img_path"),
                )
        if not self.dist.is_main:
            return None
        if sorted(seen) != list(range(len(loader.dataset))):
            raise RuntimeError(
                f"evaluation covered {len(set(seen))} distinct of {len(loader.dataset)} test images "
                f"({len(seen)} in total); this is a bug in the evaluation sharding"
            )
        results = self.evaluator.compute(out_dir=self.run_dir, vis=bool(self.cfg.vis))
        label = f"epoch {epoch}" if epoch is not None else "test"
        per_class = {k: v for k, v in results.items() if k != "mean"}
        self.log.info(
            "results (%s, %d images, each scored once by %d process(es); values x100):\n%s",
            label,
            len(seen),
            self.dist.world_size,
            format_table(per_class, getattr(self.evaluator, "undefined", None)),
        )
        if epoch is not None and self.history:
            best, at = max_over_evaluations([*self.history, {"epoch": epoch, "results": results}])
            self.log.info(
                "maximum over the %d evaluations so far, per class and metric ((eN) = from epoch N): "
                "selection on the test set, not the reported result (values x100):\n%s",
                len(self.history) + 1,
                format_rows(best, at),
            )
        step = self.global_step if epoch is not None else 0
        for cls, values in results.items():
            for name, value in values.items():
                tag = f"test/{name}" if cls == "mean" else f"test_{cls}/{name}"
                self.writer.add_scalar(tag, value * 100.0, step)
        self.history.append({"epoch": epoch, "step": step, "num_images": len(seen), "results": results})
        self._write_metrics()
        return results

    def _image_size(self) -> tuple[int, int]:
        size = self.cfg.data.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _write_metrics(self) -> None:
        """Write metrics.json (final evaluation, history, maxima over it) and metrics.csv (every row).

        Undefined metrics are null in the JSON (strict: no bare NaN) and empty in the CSV.
        """

        final = self.history[-1]
        best, at = max_over_evaluations(self.history)
        payload = {
            "final": final,
            "history": self.history,
            "max_over_evaluations": {
                "note": "per class and metric, the maximum over the evaluations in history: a selection "
                "on the test set, not the reported result (that is final)",
                "results": best,
                "epoch": at,
            },
            "note": "values are fractions in [0, 1]; null = undefined (e.g. no anomalous test image)",
        }
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(json_ready(payload), indent=2, allow_nan=False) + "\n")
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
                            *("" if math.isnan(v := values.get(n, math.nan)) else f"{v:.6f}" for n in names),
                        ]
                    )

    def test(self) -> dict[str, dict[str, float]]:
        """Evaluate the (loaded) model once."""
        with self._status():
            results = self.evaluate(None)
        self.writer.close()
        return results
