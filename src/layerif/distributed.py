"""Data parallelism over torch.distributed: samples are sharded across ranks, estimator sums all-reduced."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    """Rank and world size of this process (1 process = no communication)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over ranks (in place when distributed; returned either way)."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(f"cuda:{self.local_rank}")
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, value):
        """Rank 0's value on every rank."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def shard(self, n: int) -> list[int]:
        """Sample numbers this rank handles (round robin, so length-sorted work stays balanced)."""
        return list(range(self.rank, n, self.world_size))


def current() -> DistContext:
    """The context of this process; joins the process group when launched by torchrun / accelerate."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
