"""Process groups for training and sharded extraction under ``torchrun`` (torch's own launcher and DDP).

``torchrun --nproc-per-node N -m fmcib ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables; :func:`init_distributed` joins the group (NCCL for CUDA, gloo otherwise). Without them every
function here is the single-process identity, so the same code runs in a notebook.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "broadcast_object",
    "gather_objects",
    "gather_with_grad",
    "init_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "on_main_process",
]


def is_main_process() -> bool:
    """False only in a torchrun process other than rank 0 (which alone writes messages and files)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    """True when the environment holds a process group's description (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.distributed:
            dist.barrier()


def init_distributed(device: str | torch.device | None = None) -> DistributedContext:
    """Join the ``torchrun`` process group if there is one (once per process) and pick this rank's device.

    ``device`` None/"auto": under torchrun with GPUs, ``cuda:<LOCAL_RANK>``; otherwise as
    :func:`fmcib.models.resolve_device`. A named ``cuda`` device under torchrun also becomes ``cuda:<LOCAL_RANK>``.
    """
    from .models import resolve_device

    resolved = resolve_device(device)
    if not launched_by_torchrun():
        return DistributedContext(device=resolved)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                              device=resolved)


def _leave_process_group() -> None:
    """Destroy the process group at exit: left to the interpreter's teardown, its threads can abort a finished
    process ("terminate called without an active exception"), which torchrun reports as a failure."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, context: DistributedContext, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable, small: metrics, decisions)."""
    if not context.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not context.distributed:
        return [obj]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(x: torch.Tensor, context: DistributedContext | None) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated in rank order; gradients flow back to the
    rank that owns each part (for losses over the global batch)."""
    if context is None or not context.distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


T = TypeVar("T")


def on_main_process(fn: Callable[[], T], context: DistributedContext) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its error on every rank.

    For work that one process must do (take a lock, write the output) and that all must agree on: a failure
    on rank 0 stops every process with the same message instead of leaving the others waiting.
    """
    if not context.distributed:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if context.is_main:
        try:
            result = fn()
        except Exception as exc:  # handed to every rank below, then raised there
            error = exc
    result, error = broadcast_object((result, error), context)
    if error is not None:
        raise error
    return result
