"""What every trainer shares: the run folder, data, model, optimiser, evaluator, DDP, checkpoints.

:class:`TrainerBase` builds everything from a config and saves/restores the training state;
the loops that use it live in the trainers (:mod:`trainer.ad_trainer`). Runs as one process or
as one rank of a ``torchrun`` job: rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from data.loaders import build_loaders
from evaluation import EVALUATORS
from loss import LOSSES
from model.build import build_model
from model.ops.selective_scan import available_backends, backend_problem, prepare_cpu
from trainer.checkpointing import CheckpointMixin
from trainer.optim import SCHEDULERS, build_optimizers
from trainer.rng import (
    enable_determinism,
    enable_fast_cuda,
    full_fp32,
    seed_everything,
)
from trainer.run_folder import RunLock, check_resumable, check_resume_config, new_run_dir, write_status
from trainer.sync_bn import prepare_ddp
from util.config import BaseConfig, ConfigError, save_config
from util.distributed import broadcast_object, init_distributed
from util.logger import get_logger
from util.signals import StopRequest, TrainingInterruptedError


class _NullWriter:
    """Stands in for TensorBoard's writer on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        """Discard the value."""

    def close(self) -> None:
        """Nothing to close."""


_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainerBase(CheckpointMixin):
    """Builds data, model, loss, optimiser and evaluator from a config; saves and restores training state."""

    def __init__(self, cfg: BaseConfig, mode: str = "train") -> None:
        self.cfg = cfg
        self.mode = mode
        t = cfg.trainer
        self.dist = init_distributed(cfg.device, float(t.dist_timeout))
        self.device = self.dist.device
        if self.device.type == "cpu":
            # from the first operation on, not from the first scan: runs stay bit-identical
            prepare_cpu()
        if t.deterministic:
            enable_determinism()
        elif t.fast_cuda and self.device.type == "cuda":
            enable_fast_cuda(tf32=t.tf32)
        self.resuming = mode == "train" and bool(t.resume)
        if self.resuming:
            # before the lock: a refused folder is left as it was
            check_resumable(Path(t.resume), main=self.dist.is_main)
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
            check_resume_config(self.cfg, Path(t.resume), self.log, write=self.dist.is_main)
        self.log.info("run folder: %s", self.run_dir)
        self.log.info(
            "device: %s%s",
            self.device,
            f" x {self.dist.world_size} processes (torchrun)" if self.dist.distributed else "",
        )
        backend = getattr(getattr(cfg.model, "scan", None), "backend", "auto")  # methods that scan
        problem = backend_problem(backend, self.device)
        if problem:
            raise ConfigError(
                f"model.scan.backend={backend} cannot run here: {problem}. Use model.scan.backend=auto "
                f"(the fastest this machine has: {', '.join(available_backends())})"
            )
        self.micro_batch = self._micro_batch()
        seed_everything(cfg.seed)  # identical model initialisation on every rank
        self.train_loader, self.test_loader = build_loaders(
            cfg, self.dist, self.micro_batch, self.log, train=mode == "train"
        )
        self.model = self._build_model().to(self.device)
        self.loss_fn = LOSSES.build(cfg.loss.type, **{k: v for k, v in cfg.loss.items() if k != "type"})
        options = {k: v for k, v in cfg.evaluator.items() if k != "type"}
        self.evaluator = EVALUATORS.build(cfg.evaluator.type, **options)
        self.optimizers, self.schedulers = self._build_optimizers() if mode == "train" else ({}, {})
        self.amp_dtype = _AMP_DTYPES[t.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.start_epoch = 1
        self.skip_batches = 0
        self.eval_pending = False
        self.global_step = 0
        self.stage: str | None = None  # the method's training stage, set at each epoch's start
        self.history: list[dict[str, Any]] = []
        self.stop = StopRequest()
        seed_everything(cfg.seed + self.dist.rank)  # per-rank randomness (drop-path) from here on
        if mode == "train" and t.resume:
            if self.dist.is_main and not (self.run_dir / "config.json").is_file():
                self.log.warning("%s had no config.json; writing this run's config there", t.resume)
                save_config(cfg, self.run_dir / "config.json")
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
        """A new run whose set-up failed leaves no folder; a resume that did not start leaves the
        run's ``status.json`` as it was (a finished run stays finished) and logs why."""
        if not self.dist.is_main:
            return
        if self.resuming:
            self.log.error("resume refused or failed before training started: %s", err)
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
            return Path(self.cfg.trainer.resume)
        suffix = "" if self.mode == "train" else f"_{self.mode}"
        return new_run_dir(self.cfg.output_dir, f"{self.cfg.name}{suffix}")

    def _build_model(self) -> torch.nn.Module:
        model = build_model(self.cfg, self.log)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        self.log.info(
            "model %s: %.2f M parameters (%.2f M trainable)", self.cfg.model.type, n_all / 1e6, n_train / 1e6
        )
        return model

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over ranks (rank 0's weights win), with synchronised BatchNorm
        under ``torchrun`` unless ``trainer.sync_bn=False`` (the model itself in one process)."""
        self.model, net = prepare_ddp(model, self.dist, sync_bn=self.cfg.trainer.sync_bn)
        if self.dist.distributed and self.cfg.trainer.sync_bn:
            self.log.info("BatchNorm statistics synchronised over %d processes", self.dist.world_size)
        return net

    def _calibrate_teacher(self) -> None:
        """Give a random-weight teacher BatchNorm statistics of the training images."""
        used = self.model.calibrate_teacher(batch["img"].to(self.device) for batch in self.train_loader)
        if used:
            self.log.info("random teacher: BatchNorm statistics estimated on %d training batches", used)

    def _build_optimizers(self) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
        """The method's optimisers by name, each with its own schedule from the ``scheduler`` section."""
        o, sch, t = self.cfg.optim, self.cfg.scheduler, self.cfg.trainer
        optimizers, schedulers = {}, {}
        for name, (optimizer, values) in build_optimizers(self.model, o).items():
            optimizers[name] = optimizer
            schedulers[name] = SCHEDULERS.build(sch.type, optimizer, sch)
            self.log.info(
                "optimizer %s%s lr %.6g (base %.6g x batch %d / 16), weight decay %g (no_decay=%s); "
                "%d process(es) x %d image(s) x %d accumulation step(s)",
                values.type,
                f" ({name})" if name != "main" else "",
                values.lr,
                o.base_lr,
                self.cfg.data.batch_size,
                max(g.get("weight_decay", values.weight_decay) for g in optimizer.param_groups),
                o.no_decay,
                self.dist.world_size,
                self.micro_batch,
                t.accumulate,
            )
            group_lrs = [g["lr"] for g in optimizer.param_groups]
            if any(lr != values.lr for lr in group_lrs):  # groups with their own lr (lr_scale)
                self.log.info(
                    "optimizer %s: lr per parameter group %s",
                    name,
                    ", ".join(f"{lr:.6g}" for lr in group_lrs),
                )
        self.log.info("lr schedule %s: x%g after epoch(s) %s", sch.type, sch.gamma, sch.milestones)
        return optimizers, schedulers

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _eval_precision(self) -> Any:
        """Evaluation's numeric context: full fp32 (no autocast, no TF32) unless ``trainer.amp_eval``."""
        if self.cfg.trainer.amp_eval:
            return self._autocast()
        return full_fp32(self.device.type)

    def _log_peak_memory(self, what: str) -> None:
        """Log and record the peak GPU memory since the last call, then reset the counter."""
        if self.device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log.info("%s: peak GPU memory %.2f GiB allocated (rank %d)", what, peak, self.dist.rank)
        self.writer.add_scalar("memory/peak_gpu_gib", peak, self.global_step)
        torch.cuda.reset_peak_memory_stats(self.device)

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
