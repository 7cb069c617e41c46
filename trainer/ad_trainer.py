"""The one training and evaluation loop of every method (the hooks it calls: :mod:`model.base`).

One run = one folder ``<output_dir>/<config>_<timestamp>/`` holding ``config.json``,
``log.txt``, TensorBoard events (``tb/``), ``ckpt.pth`` (everything needed to resume),
``net.pth`` (weights only), ``metrics.json``, ``metrics.csv`` and ``status.json``. The reported
result is the last evaluation's, never the best epoch picked on the test set.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import numpy as np
import torch

from data import as_hw
from data.default_ad import read_rgb
from evaluation.report import format_rows, format_table, max_over_evaluations, write_metrics
from evaluation.scoring import score_test_set
from trainer.base import TrainerBase
from util.checkpoint import trained_epochs
from util.distributed import any_rank, wrap_ddp
from util.progress import Progress
from util.signals import TrainingInterruptedError

_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


class ADTrainer(TrainerBase):
    """Trains a method through its :class:`model.base.AnomalyModel` hooks; scores the test set on every rank.

    Every rank trains on its shard of each epoch and scores its shard of the test set, whose
    maps are gathered on rank 0 (which checks that each image came exactly once).
    """

    # ------------------------------------------------------------------ loops
    def train(self) -> dict[str, dict[str, float]] | None:
        """Train for ``trainer.epochs`` epochs, evaluating every ``trainer.test_every`` and at the end.

        SIGTERM or a first Ctrl-C saves a checkpoint at the next step and raises
        :class:`TrainingInterruptedError`; ``trainer.resume=RUN_DIR`` continues from it.
        """
        with self._status():
            return self._train()

    def _train(self) -> dict[str, dict[str, float]] | None:
        t = self.cfg.trainer
        results = None
        if self.start_epoch > t.epochs and not self.eval_pending:
            self.log.info("run already finished (%d epochs); nothing to train", t.epochs)
        with self.stop:
            if self.eval_pending:
                results = self._evaluate_and_save(self.start_epoch - 1)
            for epoch in range(self.start_epoch, t.epochs + 1):
                self._enter_stage(epoch)
                self._train_epoch(epoch, self.skip_batches)
                self.skip_batches = 0
                with warnings.catch_warnings():  # an optimiser of another stage did not step: intended
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    for scheduler in self.schedulers.values():
                        scheduler.step()
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

    def _enter_stage(self, epoch: int) -> None:
        """Tell the method when its training stage changes (and once per process, on resume too)."""
        stage = self.model.stage(epoch, self.cfg.trainer.epochs)
        if stage != self.stage:
            trainable = [p.requires_grad for p in self.model.parameters()]
            self.model.enter_stage(stage)
            if stage != "train":
                self.log.info("epoch %d: training stage %s", epoch, stage)
            self.stage = stage
            if self.dist.distributed and trainable != [p.requires_grad for p in self.model.parameters()]:
                # DDP reduces the parameters that required gradients when it was built
                self.net = wrap_ddp(self.model, self.dist)

    def _step_optimizers(self) -> None:
        """Clip each optimiser's parameters on their own (``trainer.grad_clip``) and step it; an
        optimiser none of whose parameters got a gradient (another stage's) is left alone."""
        clip = self.cfg.trainer.grad_clip
        for optimizer in self.optimizers.values():
            mine = {id(p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
            if not mine:
                continue
            self.scaler.unscale_(optimizer)
            if clip:  # in the model's parameter order, as the norm's sum was always taken
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if id(p) in mine], clip)
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def _train_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.net.train()
        t = self.cfg.trainer
        acc = int(t.accumulate)
        self.train_loader.sampler.set_epoch(epoch, skip_batches * self.micro_batch)
        set_data_epoch = getattr(self.train_loader.dataset, "set_epoch", None)  # epoch-seeded synthesis
        if set_data_epoch is not None:
            set_data_epoch(epoch)
        bar = Progress(
            self.train_loader, f"epoch {epoch}/{t.epochs}", self.log.info, enabled=self.dist.is_main
        )
        n_batches = len(self.train_loader) + skip_batches
        losses = []
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar, start=skip_batches):
            last_micro = (i + 1) % acc == 0 or i + 1 == n_batches
            loss, terms = self._micro_step(batch, epoch, sync=last_micro, scale=1.0 / acc)
            losses.append(loss)
            if not last_micro:
                continue
            self._step_optimizers()
            self.global_step += 1
            lr = next(iter(self.optimizers.values())).param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self.writer.add_scalar("train/loss", loss, self.global_step)
            if len(terms) > 1:
                for name, value in terms.items():
                    self.writer.add_scalar(f"train/{name}", value, self.global_step)
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
        self._log_peak_memory(f"epoch {epoch} training")

    def _micro_step(
        self, batch: dict[str, Any], epoch: int, sync: bool, scale: float
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward of one (micro-)batch; gradients are all-reduced only when ``sync``.

        Returns the loss (the sum of the method's loss terms) and each term.
        """
        inputs = [x.to(self.device, non_blocking=True) for x in self.model.train_inputs(batch)]
        no_sync = getattr(self.net, "no_sync", None)
        context = no_sync() if no_sync is not None and not sync else contextlib.nullcontext()
        try:
            with context:
                with self._autocast():
                    terms = self.model.loss_terms(self.net(*inputs), batch, self.loss_fn)
                    loss = sum(terms.values())
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
                    f"out of memory at epoch {epoch} with {inputs[0].shape[0]} image(s) per step on "
                    f"{self.device}: lower data.batch_size, or keep it and set trainer.accumulate=K to "
                    f"split each batch into K steps (data.batch_size must be divisible by processes x K); "
                    f"or trainer.amp=bf16"
                ) from err
            raise
        return float(loss.item()), {name: float(term.detach()) for name, term in terms.items()}

    @torch.no_grad()
    def evaluate(self, epoch: int | None = None) -> dict[str, dict[str, float]] | None:
        """Score the test set; on rank 0 log the per-class table, write metrics files and return them.

        Every rank scores its shard (:func:`evaluation.scoring.score_test_set`); rank 0 gathers
        the maps and checks that each image came exactly once.
        """
        self.net.eval()
        self.evaluator.reset()
        size = as_hw(self.cfg.data.image_size)
        scored = score_test_set(
            lambda imgs: self.model.predict(imgs, size),
            self.test_loader,
            self.evaluator,
            self.dist,
            size,
            self.log.info,
            precision=self._eval_precision,
            stop_requested=lambda: self.stop.signal is not None,
            on_stop=self._stop_during_evaluation,
        )
        if scored is None:
            return None
        self._log_peak_memory(f"evaluation of {scored} images")
        results = self.evaluator.compute(out_dir=self.run_dir, read_image=read_rgb if self.cfg.vis else None)
        label = f"epoch {epoch}" if epoch is not None else "test"
        per_class = {k: v for k, v in results.items() if k != "mean"}
        protocol = getattr(self.evaluator, "mode", "exact")
        self.log.info(
            "results (%s, %d images, each scored once by %d process(es); protocol %s; values x100):\n%s",
            label,
            scored,
            self.dist.world_size,
            protocol,
            format_table(per_class, getattr(self.evaluator, "undefined", None)),
        )
        exact = getattr(self.evaluator, "exact_results", None)
        if exact is not None:
            self.log.info(
                "the same maps under protocol exact (every threshold; docs/metrics.md) (values x100):\n%s",
                format_table({k: v for k, v in exact.items() if k != "mean"}),
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
        entry = {"epoch": epoch, "step": step, "num_images": scored, "results": results, "protocol": protocol}
        if exact is not None:
            entry["exact"] = {"protocol": "exact", "results": exact}
        if epoch is None:  # -m test: how long the scored weights trained, not the config's epochs
            entry["weights_epoch"] = trained_epochs(self.cfg.model.checkpoint)
        self.history.append(entry)
        write_metrics(self.run_dir, self.history)
        return results

    def _stop_during_evaluation(self) -> None:
        raise TrainingInterruptedError(
            f"{self.stop.name} received during evaluation; the last checkpoint of {self.run_dir} "
            f"re-runs it on resume",
            self.stop.signal or 15,
        )

    def test(self) -> dict[str, dict[str, float]]:
        """Evaluate the (loaded) model once."""
        with self._status():
            results = self.evaluate(None)
        self.writer.close()
        return results
