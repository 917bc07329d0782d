"""Data-parallel training with torch.distributed: process-group setup, batch sharding, and
the few collectives the trainer needs (all of them no-ops in a single process).

Launch with ``torchrun --nproc_per_node=N -m transformer_mt.cli.train ...``; under SLURM
(``hydra/launcher=slurm`` with ``tasks_per_node=N``) the rank and rendezvous come from the
SLURM environment through submitit. gloo is used on CPU, nccl on CUDA.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

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


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched with several processes; returns the context and
    this rank's device (``cuda:<local_rank>`` on GPUs)."""
    _export_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), device
    ctx = DistContext(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if device.type == "cuda":
        if torch.cuda.device_count() <= ctx.local_rank:
            raise UserError(
                f"rank {ctx.rank} wants cuda:{ctx.local_rank} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible"
            )
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 validates and runs the final beam search while the others wait: allow it.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3)
        )
    return ctx, device


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


def parameters_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of every parameter's bytes: equal digests mean bitwise-equal replicas."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_in_sync(model: torch.nn.Module, ctx: DistContext) -> str:
    """The parameters' digest; raises if it differs between ranks (a desynchronised job)."""
    digest = parameters_digest(model)
    digests = all_gather_object(digest, ctx)
    if len(set(digests)) != 1:
        raise RuntimeError(f"model replicas diverged across ranks: {digests}")
    return digest
