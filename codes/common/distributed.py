"""Device choice and ``torch.distributed`` set-up for runs started plainly or through ``torchrun``."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")


class PeerRankError(RuntimeError):
    """Another rank failed; this one stops too instead of waiting for it."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs and which part of the work it does."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and logs summaries."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU -> a warning and CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA was asked for but is not available; running on the CPU", stacklevel=2)
        return torch.device("cpu")
    return device


def init_distributed(requested_device: str = "auto", timeout_s: float = 1800) -> DistributedContext:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1), else a single process.

    Backend: NCCL on CUDA, gloo on CPU. Each process uses GPU ``LOCAL_RANK``. A collective that
    waits longer than ``timeout_s`` for another rank fails instead of hanging.
    """
    device = resolve_device(requested_device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    logger.info("process %d of %d on %s", rank, world_size, device)
    return DistributedContext(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list without distribution)."""
    if not context.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def shutdown_distributed(context: DistributedContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(obj: T, context: DistributedContext) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself without distribution): one rank decides."""
    if not context.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_if_any_rank_failed(error: BaseException | None, context: DistributedContext) -> None:
    """Every rank learns whether any rank failed; all of them raise, so none waits for a dead peer.

    The failing rank re-raises its own ``error``; the others raise :class:`PeerRankError` naming
    it. Call it at the same point on every rank.
    """
    if context.is_distributed:
        messages = gather_objects(None if error is None else f"{type(error).__name__}: {error}", context)
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise PeerRankError(f"rank {rank} failed: {message}")
    if error is not None:
        raise error


def run_on_main(function: Callable[[], T], context: DistributedContext) -> T:
    """``function()`` on rank 0 only; its result (or its failure) reaches every rank."""
    result, error = None, None
    if context.is_main:
        try:
            result = function()
        except Exception as caught:  # shared with the other ranks, then re-raised
            error = caught
    raise_if_any_rank_failed(error, context)
    return broadcast_from_main(result, context)


def shard_indices(order: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """This rank's share of ``order``, padded like ``DistributedSampler``: every rank gets
    ``ceil(len / world_size)`` indices (the first ones repeated), so no rank runs out of batches
    first. Without distribution, ``order`` itself."""
    if not context.is_distributed:
        return order
    per_rank = -(-len(order) // context.world_size)
    padding = per_rank * context.world_size - len(order)
    if padding:
        order = torch.cat([order, order.repeat(-(-padding // max(len(order), 1)))[:padding]])
    return order[context.rank :: context.world_size]
