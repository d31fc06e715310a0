"""DistributedDataParallel plumbing, in the torchvision-reference style: set up from torchrun's
environment, a few collective helpers, and nothing else. Without torchrun every helper degrades to
the single-process answer, so the rest of the code never branches on it."""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed_mode(device_name: str = "auto") -> DistributedContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs,
    gloo on CPUs. A plain ``python main.py`` gets the single-process context."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistributedContext()
    context = DistributedContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": torch.device("cuda", context.local_rank)} if use_cuda else {}),
        )
    return context


_LOCAL_ONLY = contextvars.ContextVar("cipl_local_only", default=False)


@contextlib.contextmanager
def local_only():
    """Within this block this process behaves as a single process (no collectives): for work only
    rank 0 does, such as rendering the final report's figures."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def current_context() -> DistributedContext:
    if _LOCAL_ONLY.get() or not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier() -> None:
    if current_context().enabled:
        dist.barrier()


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order."""
    context = current_context()
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, source: int = 0):
    if not current_context().enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def broadcast_tensor(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``source``'s copy."""
    if current_context().enabled:
        dist.broadcast(tensor, src=source)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if current_context().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard_indices(length: int, context: DistributedContext | None = None) -> list[int]:
    """This rank's share of range(length): every world_size-th index, no padding."""
    context = context or current_context()
    return list(range(context.rank, length, context.world_size))


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
