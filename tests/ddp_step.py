"""Run by tests/test_distributed.py under torchrun or alone: one training step's gradients.

Builds the trainer from a config (the same set-up as ``run.py``) with every floating-point
tensor in float64, takes the first training batch of epoch 1 and runs one forward/backward
through the (DDP-wrapped) network. BatchNorm layers use their running statistics, so each
image's loss term depends on that image alone: the mean loss of a batch split over ranks is
then, in exact arithmetic, the mean of the per-rank means, whatever the images are. With
``--train-bn`` they stay in training mode (batch statistics): ranks then agree with one process
only when ``trainer.sync_bn`` pools the statistics of the whole batch.

Rank 0 saves the loss (the mean of the ranks' losses), every parameter's gradient after DDP's
all-reduce (``grads``) and, for the test's negative controls, the same step's gradient without
the all-reduce (``local``: the gradient of rank 0's share of the batch alone).

Usage: ``python tests/ddp_step.py [--train-bn] CONFIG OUT.pth [section.key=value ...]``
"""

from __future__ import annotations

import sys

import torch

from trainer.ad_trainer import ADTrainer
from trainer.sync_bn import SyncBatchNorm
from util.config import load_config
from util.distributed import gather_objects


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class Float64Trainer(ADTrainer):
    """The trainer with its model in float64 before DDP wraps it."""

    def _build_model(self) -> torch.nn.Module:
        return super()._build_model().double()


def main(argv: list[str]) -> None:
    """One step; rank 0 writes ``{"loss", "world_size", "grads", "local"}``."""
    train_bn = argv[0] == "--train-bn"
    config, out, *overrides = argv[1:] if train_bn else argv
    trainer = Float64Trainer(load_config(config, overrides))
    trainer.net.train()
    for module in trainer.net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not train_bn:
            module.eval()
    trainer.train_loader.sampler.set_epoch(1, 0)
    batch = next(iter(trainer.train_loader))
    batch["img"] = batch["img"].double()
    loss, _ = trainer._micro_step(batch, epoch=1, sync=True, scale=1.0)
    loss = sum(gather_objects(loss, trainer.dist)) / trainer.dist.world_size  # the whole batch's
    grads = _gradients(trainer.model)
    trainer.optimizers["main"].zero_grad(set_to_none=True)
    trainer._micro_step(batch, epoch=1, sync=False, scale=1.0)
    local = _gradients(trainer.model)
    if trainer.dist.is_main:
        synced = sum(isinstance(m, SyncBatchNorm) for m in trainer.model.modules())
        result = {"loss": loss, "world_size": trainer.dist.world_size, "grads": grads, "local": local}
        result["sync_bn_layers"] = synced
        torch.save(result, out)
    trainer.writer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
