"""Process groups, samplers and collectives for ``torchrun`` data-parallel runs.

A plain ``python run.py`` is a world of one process: every helper here then degrades to a
no-op, so the trainer has one code path. Under ``torchrun`` the environment variables it
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) start a NCCL (GPU) or Gloo (CPU) group.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from util.errors import UsageError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


class DeviceError(UsageError, RuntimeError):
    """The configured device is not on this machine."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; other names (and devices) pass through to torch."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device: str = "auto", timeout_s: float = 3600.0) -> DistContext:
    """Join the ``torchrun`` process group when launched by it; otherwise a single-process context.

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    Each rank of a CUDA job takes the GPU of its ``LOCAL_RANK`` and binds the group to it
    (``device_id``: NCCL connects eagerly, and a collective cannot land on another GPU).
    ``timeout_s`` bounds how long a rank waits in a collective: the other ranks wait while
    rank 0 computes the metrics, which on a large test set outlasts PyTorch's 10-minute default.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={device} but CUDA is not available here; use device=cpu or device=auto"
            )
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    """Leave the process group (if any) so that torchrun sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_padded(tensor: torch.Tensor, rows: int, ctx: DistContext) -> list[torch.Tensor]:
    """All ranks' ``tensor`` (first dim ``<= rows``, padded to ``rows`` for the collective), trimmed back.

    Ranks may hold different numbers of rows (including none); the row counts travel in a
    first, tiny collective so that padding never reaches the caller.
    """
    if not ctx.distributed:
        return [tensor]
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    dist.all_gather(counts, n)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return [part[: int(c.item())] for part, c in zip(parts, counts, strict=True)]


def any_rank(flags: list[bool], ctx: DistContext) -> list[bool]:
    """Per flag: whether it is set on at least one rank (one small all-reduce)."""
    if not ctx.distributed:
        return flags
    t = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class EpochShardSampler(Sampler[int]):
    """Training order: a fresh permutation per epoch (``seed + epoch``), split across ranks.

    The order depends only on the seed, the epoch and the world size, so a resumed run
    sees the same batches as an uninterrupted one; ``skip`` drops this rank's first
    indices (the batches an interrupted epoch had already trained on). The permutation
    is cut to a multiple of the world size so every rank gets as many samples.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and how many of this rank's indices to leave out."""
        self.epoch = epoch
        self.skip = skip

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        usable = (self.size // self.world_size) * self.world_size or self.size
        return perm[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


class ShardSampler(Sampler[int]):
    """Evaluation order: rank ``r`` takes indices ``r, r + W, r + 2W, ...`` with no padding.

    Unlike ``DistributedSampler``, nothing is repeated to even out the shards, so no test
    image is counted twice; shards differ in length by at most one.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def steps_for_all(size: int, batch: int, world_size: int) -> int:
    """Batches of the longest evaluation shard: every rank joins that many gathers."""
    return math.ceil(math.ceil(size / world_size) / batch) if size else 0


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, always: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel`` over ranks (rank 0's weights win); the model itself in one process
    unless ``always`` (a process group of one must then exist).

    Parameters the model lists in ``unused_parameter_names()`` (kept only for checkpoint
    compatibility) are excluded, so DDP neither waits for their gradients nor needs the
    slower ``find_unused_parameters`` search.
    """
    if not (ctx.distributed or always):
        return model
    ddp = torch.nn.parallel.DistributedDataParallel
    unused = getattr(model, "unused_parameter_names", list)()
    if unused:
        ddp._set_params_and_buffers_to_ignore_for_model(model, unused)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return ddp(model, device_ids=ids)
