"""torch.distributed helpers for contrastive training across processes.

The contrastive loss wants every rank's features as negatives. `gather_with_grad`
all-gathers them; its backward sums the feature gradients from every rank back onto
their owner (as open_clip's gather-with-grad does), and DDP's gradient averaging then
yields exactly the full-batch gradient.

Shutdown: `cleanup` must leave no gloo thread alive when the interpreter exits. A
gloo worker thread that drops the last reference to a finished collective's tensor
after finalisation has begun cannot take the GIL; the thread is then unwound through
a noexcept destructor and the process dies with SIGABRT ("terminate called without
an active exception"). The threads are joined only when the last reference to the
process group goes, so nothing may keep one past `destroy_process_group`: not a
live DDP wrapper (its reducer holds the group), and not `torch.distributed.nn`,
whose functions bind `group.WORLD` as a default argument when first imported. DDP
imports it lazily, after the group exists; importing it here, before any group is
created, keeps those defaults None. (The gather below is its own small autograd
function: `torch.distributed.nn`'s all_gather is deprecated.)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  (before any process group: see above)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes through env vars; a lone process needs none.

    gloo on CPU, nccl on CUDA. Returns the process's place in the world.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered rows
    and hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        lo, hi = ctx.rows
        return total[lo:hi]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from every rank in rank order;
    gradients flow back to each owner."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order, without autograd."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging: loss, throughput)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, joining its threads (see the module docstring).

    The caller must have dropped its DDP wrappers first; collecting garbage here
    frees those that only a reference cycle still keeps."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

