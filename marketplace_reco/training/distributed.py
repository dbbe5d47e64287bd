"""torchrun / DistributedDataParallel helpers: one code path for a single process and for N processes.

A script calls ``init_distributed()`` once. Run plainly it gets a one-process context and every helper
is a no-op; run under ``torchrun --nproc_per_node N`` it joins the process group (gloo on CPU, nccl on
CUDA), shards the data, averages gradients through DDP and all-reduces validation metrics, so every
rank takes the same early-stopping decisions. Only the main rank (rank 0) writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the run: its rank, how many processes, and the device it trains on."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
        if self.is_distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (call once, at the end of the script)."""
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def _cpu_count() -> int:
    """Cores this process may use (the affinity mask, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_distributed() -> DistributedContext:
    """Join the torchrun process group when launched by torchrun; otherwise a single-process context.

    Also sets torch's intra-op threads to the cores per local process, unless ``OMP_NUM_THREADS`` says
    otherwise (torch already follows it; torchrun sets it to 1 for N > 1 processes): N processes each
    using every core oversubscribe the CPU and run many times slower than one.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, _cpu_count() // max(1, local_world_size)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, is_main=rank == 0, device=device,
                              local_rank=local_rank)


def single_process_context(device: torch.device | str = "cpu") -> DistributedContext:
    """The context of a plain (non-torchrun) run on ``device``, for code that takes an optional context."""
    return DistributedContext(rank=0, world_size=1, is_main=True, device=torch.device(device))


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Move ``model`` to the context's device; wrap it in DDP when there is more than one process.

    DDP broadcasts rank 0's parameters at construction, so every rank starts from the same weights.
    """
    model = model.to(context.device)
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the one whose state dict is saved), or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class _StridedShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: an exact partition, unlike DistributedSampler which pads
    with repeated samples. Used for evaluation, where a repeated sample would bias the metrics."""

    def __init__(self, length: int, context: DistributedContext) -> None:
        self.indices = list(range(context.rank, length, context.world_size))

    def __iter__(self) -> Any:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_sampler(dataset: Dataset, context: DistributedContext, *, shuffle: bool, seed: int = 0) -> Sampler[int]:
    """This rank's share of ``dataset``.

    Training (``shuffle=True``): a ``DistributedSampler`` that reshuffles every epoch (``fit`` calls its
    ``set_epoch``); with one process it is simply a random permutation of the whole dataset.
    Evaluation (``shuffle=False``): a strided exact partition, so all-reduced metrics count each sample once.
    """
    if shuffle:
        return DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                  seed=seed)
    return _StridedShardSampler(len(dataset), context)  # type: ignore[arg-type]


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves with one process)."""
    if not context.is_distributed:
        return list(values)
    # gloo reduces CPU tensors, nccl CUDA tensors.
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
