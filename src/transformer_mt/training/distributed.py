"""Data-parallel training with torch.distributed: process-group setup, batch sharding, and
the few collectives the trainer needs (all of them no-ops in a single process).

Launch with ``torchrun --nproc_per_node=N -m transformer_mt.cli.train ...``; under SLURM
(``hydra/launcher=slurm`` with ``tasks_per_node=N``) the rank and rendezvous come from the
SLURM environment through submitit. gloo is used on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator
from transformer_mt.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and results."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True in a job of several processes."""
        return self.world_size > 1


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched as a distributed job)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _export_slurm_env() -> None:
    """Under SLURM with several tasks and no torchrun, set RANK/WORLD_SIZE/MASTER_* from it."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit  # only needed on a SLURM cluster

    submitit.helpers.TorchDistributedEnvironment().export()


def job_context() -> DistContext:
    """Where this process sits in the job, as its launcher (torchrun, or SLURM) set it; a
    single-process context when not launched as a distributed job. Joins nothing."""
    _export_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    return DistContext(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the process group of the job ``ctx`` (:func:`job_context`) when it has several
    processes; returns this rank's device (``cuda:<local_rank>`` on GPUs)."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= ctx.local_rank:
            raise UserError(
                f"rank {ctx.rank} wants cuda:{ctx.local_rank} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible"
            )
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 writes checkpoints and averages while the others wait: allow it time.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(hours=3),
            device_id=device if device.type == "cuda" else None,  # binds NCCL to this GPU
        )
    return device


def shutdown_distributed() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list[T], ctx: DistContext) -> list[T]:
    """This rank's share of ``items``: every world_size-th one, starting at its rank."""
    return items[ctx.rank :: ctx.world_size]


def all_reduce_sum(value: float, ctx: DistContext, device: torch.device) -> float:
    """The sum of ``value`` over all ranks."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks."""
    if ctx.enabled:
        dist.barrier()


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def parameters_checksum(model: torch.nn.Module, chunk: int = 1 << 22) -> torch.Tensor:
    """Two int64 sums over the bit patterns of every parameter, plain and weighted by
    position, computed where the parameters are (no copy to the host): replicas whose
    parameters differ in any bit give different sums, barring a vanishing coincidence.
    Integer sums wrap identically in any order, so equal parameters give equal sums, and the
    sums do not depend on ``chunk``: the elements taken at a time (its int64 temporaries take
    3 × 8 bytes each, 96 MiB at the default, whatever the size of the largest parameter)."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.int64, device=device)
    for p in model.parameters():
        bits = p.detach().reshape(-1).view(_BITS[p.element_size()])
        for start in range(0, bits.numel(), chunk):
            part = bits[start : start + chunk].long()
            positions = torch.arange(start + 1, start + part.numel() + 1, device=device)
            total[0] += part.sum()
            total[1] += (part * positions).sum()
    return total


def check_replicas_in_sync(model: torch.nn.Module, ctx: DistContext) -> str:
    """The parameters' checksum as hex; raises if it differs between ranks (a
    desynchronised job). One small all-gather and one host copy of 2·world_size numbers."""
    checksum = parameters_checksum(model)
    gathered = [torch.empty_like(checksum) for _ in range(ctx.world_size)]
    if ctx.enabled:
        dist.all_gather(gathered, checksum)
    else:
        gathered = [checksum]
    sums = [tuple(c) for c in torch.stack(gathered).cpu().tolist()]
    if len(set(sums)) != 1:
        raise RuntimeError(f"model replicas diverged across ranks: checksums {sums}")
    return "".join(f"{v & (2**64 - 1):016x}" for v in sums[0])


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank."""
    if ctx.enabled:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


class ShardedTranslator(Translator):
    """A Translator whose ``translate`` shares the sentences out between the ranks of a
    job: each decodes every world_size-th one, and every rank gets all translations in
    order (validation and the final evaluation use it). Decoding does not depend on the
    batch, so on a CPU the translations are those of one process; on GPUs, where other
    batch shapes can mean other kernels, up to floating-point rounding."""

    def __init__(self, translator: Translator, ctx: DistContext) -> None:
        self._init_like(translator)  # its model and half-precision copy
        self.ctx = ctx

    def translate(  # type: ignore[override]
        self, sentences: list[str], options: SearchOptions | None = None, **kwargs: Any
    ) -> list[str] | list[list[str]]:
        """As :meth:`Translator.translate`, each rank decoding its share."""
        ctx = self.ctx
        if not ctx.enabled:
            return super().translate(sentences, options, **kwargs)
        mine = super().translate(shard(sentences, ctx), options, **kwargs)
        out: list[Any] = [None] * len(sentences)
        for rank, part in enumerate(all_gather_object(mine, ctx)):
            out[rank :: ctx.world_size] = part
        return out
