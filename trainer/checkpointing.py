"""Saving and restoring a training run's state: what a resume needs to end as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

from trainer.rng import rng_state, set_rng_state
from util.checkpoint import atomic_save, load_file, remove_partial_writes, save_rotating
from util.config import config_to_dict
from util.distributed import barrier, gather_objects


class CheckpointMixin:
    """``ckpt.pth`` (weights, every optimiser and schedule by name, scaler, progress, history, every
    rank's RNG streams and the config) and ``net.pth`` (weights only) of :class:`trainer.base.TrainerBase`."""

    def _checkpoint(self, epoch: int, batches_done: int = 0, eval_pending: bool = False) -> None:
        """Save everything a resume needs; ``epoch`` = last completed epoch (collective call)."""
        rngs = gather_objects(rng_state(), self.dist)
        if not self.dist.is_main:
            return
        state = {
            "net": self.model.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sch.state_dict() for name, sch in self.schedulers.items()},
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
        # checkpoints before named optimisers held one, "optimizer"/"scheduler": the method's "main"
        optimizers = state.get("optimizers", {"main": state.get("optimizer")})
        schedulers = state.get("schedulers", {"main": state.get("scheduler")})
        for name, opt in self.optimizers.items():
            opt.load_state_dict(optimizers[name])
            self.schedulers[name].load_state_dict(schedulers[name])
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

    def _last_good_weights(self) -> str:
        if (self.run_dir / "ckpt.pth").is_file():
            return f"; the last good weights are in {self.run_dir / 'ckpt.pth'}."
        return "; no checkpoint has been written yet (the failure came before the first save)."
