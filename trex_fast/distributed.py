"""One process per device under torchrun (DESIGN.md "Scale"); single-process otherwise.

NCCL on CUDA, gloo on CPU. Multi-node is torchrun's job: nothing here assumes one machine.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not is_distributed():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", "0")),
                        int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return DistInfo(0, 1, 0, 1)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x [n, ...] from every rank along dim 0 (rank order); x itself if alone."""
    if not is_distributed():
        return x
    out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]),
                      dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x.contiguous())
    return out


# torch 2.14 renamed all_gather_into_tensor (which still works, with a warning); the GPU
# machines run torch 2.11, which only has the old name.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def agree_max(values: list[int], device: torch.device) -> torch.Tensor | None:
    """The element-wise maximum over every rank of `values` (small host ints), left on the
    device for the caller to read with other values in one copy; None when alone. No host
    sync: each value is a fill kernel's argument (not a host-to-device copy of Python data),
    and under NCCL the all-reduce is only queued."""
    if not is_distributed():
        return None
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")  # gloo reduces host tensors
    t = torch.stack([torch.full((), v, dtype=torch.int64, device=device) for v in values])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_to_main(obj) -> list | None:
    """obj of every rank, in rank order, on rank 0 (None elsewhere); [obj] when alone. The
    objects are pickled for the transfer only; tensors in them must be on the CPU."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


MAIN_WORK_TIMEOUT = datetime.timedelta(hours=48)  # e.g. the IN1K probe's feature extraction


def main_then_all(work: Callable[[], object]) -> object:
    """work() on rank 0 while the other ranks wait for it; its result on rank 0, None elsewhere.
    The wait is a barrier of a gloo group made for it: a collective of the training group
    (NCCL) would be ended by its watchdog after the group's 30 minutes. If work() raises,
    torchrun ends the waiting ranks when rank 0 exits."""
    if not is_distributed():
        return work()
    group = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)
    result = work() if dist.get_rank() == 0 else None
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return result
