"""Scale-out in one place: process group from torchrun's environment, DDP or FSDP2 wrapping,
and the few collectives the trainer needs.  gloo on the CPU, nccl on CUDA.

    torchrun --nproc_per_node 2 -m mmcore train ...          # DDP
    torchrun --nproc_per_node 2 -m mmcore train --fsdp ...   # FSDP2 (fully_shard per layer)

A single process (no WORLD_SIZE, or WORLD_SIZE=1) runs without a process group and without
wrapping (unless fsdp=True, which still shards over one rank so the code path is the same).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "setup", "wrap", "unwrap", "teardown", "all_reduce_sum", "gather_objects",
           "broadcast_object", "barrier"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world > 1


def setup(device: str = "cpu", fsdp: bool = False) -> Dist:
    """Join torchrun's process group (WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR ...): gloo
    for CPU, nccl for CUDA.  Each CUDA rank takes device cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: no CUDA device on this machine")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    owns = False
    if (world > 1 or fsdp) and not dist.is_initialized():
        if world == 1:  # a one-rank group so that fully_shard has a mesh
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=30))
        owns = True
    return Dist(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap(model: nn.Module, d: Dist, fsdp: bool = False) -> nn.Module:
    """DDP when world > 1; FSDP2 (``fully_shard`` on each unit of ``model.fsdp_units()`` —
    the encoder layers — then on the root) when fsdp; else the model itself."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        units = model.fsdp_units() if hasattr(model, "fsdp_units") else []
        for m in units:
            fully_shard(m)
        fully_shard(model)
        return model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place: no wrapper)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: List[float], d: Dist) -> List[float]:
    """Sum a few floats over the ranks (float64 on the CPU for gloo)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's obj on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
