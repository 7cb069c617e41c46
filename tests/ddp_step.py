"""Run by tests/test_distributed.py under torchrun or alone: one training step's gradients.

Builds the trainer from a config (the same set-up as ``run.py``), takes the first training
batch of epoch 1, runs one forward/backward through the (DDP-wrapped) network and saves, on
rank 0, the loss and every parameter's gradient (after DDP's all-reduce) to the given file.

Usage: ``python tests/ddp_step.py CONFIG OUT.pth [section.key=value ...]``
"""

from __future__ import annotations

import sys

import torch

from trainer.ad_trainer import ADTrainer
from util.config import load_config


def main(argv: list[str]) -> None:
    """One step; rank 0 writes ``{"loss", "world_size", "grads"}``."""
    config, out, *overrides = argv
    trainer = ADTrainer(load_config(config, overrides))
    trainer.net.train()
    trainer.train_loader.sampler.set_epoch(1, 0)
    batch = next(iter(trainer.train_loader))
    loss = trainer._micro_step(batch, epoch=1, sync=True, scale=1.0)
    if trainer.dist.is_main:
        named = trainer.model.named_parameters()
        grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
        torch.save({"loss": loss, "world_size": trainer.dist.world_size, "grads": grads}, out)
    trainer.writer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
