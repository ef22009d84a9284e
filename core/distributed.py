"""Running one command as several processes under ``torchrun``: training (DDP), scoring, embedding, generation.

    torchrun --nproc_per_node=4 train/joint.py CONFIG                 # one machine, 4 GPUs
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train/joint.py CONFIG
    torchrun --nproc_per_node=2 infer.py test/ --submission sub.csv   # scoring, each process a shard

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; without them a command runs
in one process and nothing here does anything. Training: each process takes every ``world``-th sample of
an epoch and DDP averages the gradients. Work that is a list of items (images to score, to embed, to
generate from) is cut into contiguous shards (:func:`shard_bounds`), one per process. Rank 0 alone writes
the final outputs while the others wait at a barrier. On CPU the gloo backend is used (how the tests run
two processes without a GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


#: How long a process that has finished its shard waits for the others at the end (scoring, embedding,
#: generation). Shards are equal in count, not in time (image sizes, videos, a slower GPU), and a collective
#: that waits past the group's timeout (10 minutes by default with NCCL) would fail a run that is fine.
#: A process that dies does not leave the others waiting: torchrun stops them all at once.
SHARD_WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Processes of this run, as torchrun tells them in the environment (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 under torchrun, or the only process: the one that prints, logs and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> Dist:
    """Join the process group torchrun describes in the environment (no-op when run directly).

    ``timeout``: how long a collective may wait (torch's default: 10 minutes with NCCL, 30 with gloo);
    sharded work passes :data:`SHARD_WAIT`. On a GPU the group is bound to ``cuda:LOCAL_RANK``.
    """
    world = world_size()
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, local_rank)


def process_device(device: torch.device, d: Dist) -> torch.device:
    """This process's GPU under torchrun (``cuda:LOCAL_RANK``); the CPU stays the CPU."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.enabled else device


def barrier(d: Dist) -> None:
    """Wait for every process (no-op in one process)."""
    if d.enabled:
        dist.barrier()


def broadcast(value: Any, d: Dist) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the decision to stop early)."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(d: Dist) -> None:
    """Leave the process group (no-op in one process)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice ``[start, end)`` of ``n`` items that process ``rank`` of ``world`` takes: the first
    ``n % world`` processes get one item more, so shards differ by at most one item and cover all ``n``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} processes")
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def gather(value: Any, d: Dist) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` in one process)."""
    if not d.enabled:
        return [value]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, value)
    return out
