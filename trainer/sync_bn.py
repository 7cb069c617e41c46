"""BatchNorm statistics over every rank's images (SyncBatchNorm), and the model's data-parallel wrapping.

The authors' framework (ADer) converts every BatchNorm layer to SyncBatchNorm whenever it runs
distributed, so H-FPN's statistics cover the whole global batch instead of each GPU's share.
On CUDA this uses PyTorch's own ``torch.nn.SyncBatchNorm`` (NCCL kernels, what the authors ran);
PyTorch's layer refuses CPU tensors, so on other devices :class:`SyncBatchNorm` here does the
same with ordinary collectives (Gloo), which is what lets the tests check the maths on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from util.distributed import DistContext, wrap_ddp


class _GatherStats(torch.autograd.Function):
    """all_gather of one small tensor, differentiable: the backward sums every rank's gradient of
    each slice (an all-reduce) and returns this rank's (Gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, stats: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, stats.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the images of all ranks, on any device.

    Each rank's mean and (biased) variance are gathered with its image count and combined exactly
    (the pooled mean and the law of total variance), so in exact arithmetic every output equals
    plain BatchNorm on the concatenated batch; running statistics get the unbiased variance of the
    whole batch, as in ``torch.nn.SyncBatchNorm``. Outside training or in a world of one process
    it is plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(x)
        self._check_input_dim(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // channels)
        stats = torch.cat([x.mean(dims), x.var(dims, unbiased=False), count])
        every = _GatherStats.apply(stats)
        means, variances, counts = every[:, :channels], every[:, channels:-1], every[:, -1:].detach()
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * total / (total - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` made synchronised: PyTorch's layer on CUDA, :class:`SyncBatchNorm`
    elsewhere. Parameters (and their ``requires_grad``), buffers and train/eval mode carry over, so
    state-dict keys and frozen layers stay as they were."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        synced = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module


def prepare_ddp(
    model: nn.Module, ctx: DistContext, sync_bn: bool, always: bool = False
) -> tuple[nn.Module, nn.Module]:
    """``(model, net)`` for data-parallel training: ``model`` with synchronised BatchNorm when
    ``sync_bn`` and the job is distributed (or ``always``), and ``net``, the DDP wrapper the
    trainer calls (the model itself in a single process unless ``always``, which the GPU check
    uses to exercise DDP on a machine with one GPU)."""
    if sync_bn and (ctx.distributed or always):
        model = convert_sync_batchnorm(model, ctx.device)
    return model, wrap_ddp(model, ctx, always=always)
