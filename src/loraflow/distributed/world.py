"""The processes of a run: torchrun starts them and sets RANK, WORLD_SIZE and LOCAL_RANK;
``start`` joins the process group (NCCL on CUDA, gloo on the CPU) and picks this process's
device (cuda:LOCAL_RANK).

    torchrun --nproc-per-node 4 -m loraflow.cli pretrain --parallel fsdp ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Parallel = Literal["none", "ddp", "fsdp"]
PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    parallel: Parallel

    @property
    def main(self) -> bool:
        """The process that logs, prints and writes the files every process shares."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.parallel != "none":
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (so that all take the same branch)."""
        if self.parallel == "none":
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (a loss, say)."""
        if self.parallel == "none":
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.size


def start(parallel: Parallel, device: str) -> World:
    """Join torchrun's process group for ``parallel`` ("ddp" or "fsdp"); "none": one process."""
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel must be one of {PARALLEL}, got {parallel!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if launched > 1:
            raise ValueError(
                f"torchrun started {launched} processes but --parallel is none: each would train alone "
                "and write the same files; pass --parallel ddp or --parallel fsdp"
            )
        return World(0, 1, torch.device(device), "none")
    if "RANK" not in os.environ:
        raise ValueError(
            f"--parallel {parallel} runs one process per device under torchrun: "
            f"torchrun --nproc-per-node N -m loraflow.cli ... --parallel {parallel}"
        )
    dev = torch.device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"process {local} of this node has no GPU ({torch.cuda.device_count()} visible): "
                "start at most that many processes (--nproc-per-node)"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dev, parallel)


def stop(world: World) -> None:
    if world.parallel != "none" and dist.is_initialized():
        dist.destroy_process_group()
