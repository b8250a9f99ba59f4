"""Several processes under `torchrun` (one per device; NCCL on GPUs, gloo on CPU): the engine of data-parallel
fine-tuning (`avq.finetune`) and of sharded quantization (`avq.run.quantize`: each pass's layers are solved
by different ranks and gathered).

`setup()` reads torchrun's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR/PORT`): with
more than one process it initialises the default process group (unless the caller already did) and picks
the device (`cuda:LOCAL_RANK` when CUDA is available, else CPU). Without torchrun everything here is a
no-op on one process.

Data parallelism is DDP's: every rank holds the whole model, takes an equal contiguous shard of each batch
(`shard`), and the gradients are averaged over ranks (`all_reduce_mean_`, one flattened all-reduce per
step) before the optimizer step; with equal shards the averaged gradient *is* the gradient of the full
batch's mean loss, so N ranks with `batch / N` rows each reproduce one rank with the whole batch (up to
float summation order). The shadows of the V step are not module parameters, which is why the gradients
are reduced here rather than by wrapping the model in `DistributedDataParallel`: one call covers model
parameters and shadows alike. Optimizer updates, V steps and SeMI then run identically on every rank;
after each V step `check_same` verifies that the ranks agree. Only the main rank writes files, logs and
shows progress. FSDP (sharding a model that does not fit one device) is not implemented.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | torch.device | None = None) -> DistContext:
    """The process's rank, world size and device; initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(
            f"process {local_rank} would use {device}, but only {torch.cuda.device_count()} CUDA device(s) "
            "are visible: start at most one process per GPU (or pass device='cpu' / --device cpu)"
        )
    if world <= 1:
        return DistContext(device=device)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        initialized_here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here)


def current(device: str | torch.device | None = None) -> DistContext:
    """The context of an already initialised process group (e.g. by `setup` in the CLI), or one process."""
    device = torch.device(device or "cpu")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if `setup` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shard(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous share of `n` rows (`n` must be divisible by the world size)."""
    if n % ctx.world_size:
        raise ValueError(f"a batch of {n} rows cannot be split evenly over {ctx.world_size} ranks")
    size = n // ctx.world_size
    return slice(ctx.rank * size, (ctx.rank + 1) * size)


def all_reduce_mean_(tensors: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Average `tensors` (float) over ranks, in place, with one flattened all-reduce."""
    if not ctx.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: Sequence[torch.Tensor], ctx: DistContext, src: int = 0) -> None:
    """Copy `tensors` from rank `src` to every rank, in place (integers travel as int64: gloo has no
    uint16)."""
    if not ctx.distributed:
        return
    for t in tensors:
        wire = t.detach() if t.is_floating_point() else t.detach().to(torch.int64)
        wire = wire.contiguous().clone()
        dist.broadcast(wire, src=src)
        with torch.no_grad():
            t.copy_(wire.to(t.dtype))


def all_gather_rows(x: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's `x` (same shape on every rank), in rank order."""
    if not ctx.distributed:
        return [x]
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return parts


def check_same(values: Sequence[float], ctx: DistContext, what: str) -> None:
    """Raise if the ranks disagree on `values` (e.g. per-layer counts of changed codes after a V step)."""
    if not ctx.distributed or not values:
        return
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"ranks diverged: {what} differs between processes (rank {ctx.rank} has {local.tolist()}); "
            "every rank must run the same code on the same data"
        )
