"""Optimizer steps on FSDP2 shards: each process updates its own slice of every weight.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a DTensor sharded along
one dimension over the processes (a 1-D device mesh). Element-wise optimizers (AdamW) need
nothing more than the local slice. GaLore and APOLLO project one side of each gradient
G (m x n); the projection stays local when the shard holds whole channels of the side that
is kept:

    right projection, R = G Q (Q: n x r)   rows sharded (Shard(0)):    R_i = G_i Q
    left projection,  R = Pᵀ G (P: m x r)  columns sharded (Shard(1)): R_i = Pᵀ G_i

``lowrank_placement`` shards every weight so (rows where GaLore's ``std`` rule projects on
the right, m >= n; columns where it projects on the left, when they split evenly: FSDP2
splits other dimensions than the first only evenly). The basis needs the whole gradient
only through its Gram matrix, which is a sum over the shards,

    Gᵀ G = Σ_i G_iᵀ G_i   (rows sharded),     G Gᵀ = Σ_i G_i G_iᵀ   (columns sharded),

so a refresh costs one all-reduce of an n x n (m x m) matrix (GaLore 2, Su et al. 2025,
makes the same observation). Norms over a whole weight (APOLLO's tensor scaling and norm
limiter) are one all-reduce of a scalar. A weight sharded along the other side (columns that
do not split evenly, another ``proj_type``) is stepped whole: its gradient all-gathered, its
states kept whole on every process (``state["whole"]``), this process's slice of the update
applied (``mine``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass
class Part:
    """A parameter as its process sees it."""

    weight: torch.Tensor  # the local slice (a view: writing it writes the parameter)
    grad: torch.Tensor | None  # its gradient's local slice
    shape: tuple[int, ...]  # the whole parameter's shape
    dim: int | None  # the dimension split over the processes; None: all of it is here
    group: dist.ProcessGroup | None  # the processes sharing it (for all-reduces)


def part(p: torch.Tensor) -> Part:
    """The local view of ``p``: itself for a plain tensor; the shard of a DTensor."""
    if not isinstance(p, DTensor):
        return Part(p, p.grad, tuple(p.shape), None, None)
    if p.device_mesh.ndim != 1:
        raise ValueError(
            f"loraflow's optimizers step FSDP shards over a 1-D device mesh; this parameter lives on a "
            f"{p.device_mesh.ndim}-D mesh (HSDP): shard over one mesh dimension"
        )
    (placement,) = p.placements
    grad = p.grad.to_local() if p.grad is not None else None
    if isinstance(placement, Replicate):
        return Part(p.to_local(), grad, tuple(p.shape), None, None)
    assert isinstance(placement, Shard), f"unexpected placement {placement}"
    return Part(p.to_local(), grad, tuple(p.shape), placement.dim, p.device_mesh.get_group())


def all_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Σ over the processes of ``group`` (in place); ``t`` itself without a group."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def is_local(which: str, dim: int | None) -> bool:
    """Whether the projection on ``which`` side of a weight sharded along ``dim`` needs no
    other process's slice (rows for a right projection, columns for a left one)."""
    return dim is None or (which, dim) in (("right", 0), ("left", 1))


def mine(whole: torch.Tensor, here: Part) -> torch.Tensor:
    """This process's slice of a tensor shaped as the whole parameter (FSDP2's split: the
    first processes take ceil(size / N) each, along ``here.dim``)."""
    rank, world = dist.get_rank(here.group), dist.get_world_size(here.group)
    size = whole.shape[here.dim]
    step = -(-size // world)
    part = whole.narrow(here.dim, min(rank * step, size), max(0, min(step, size - rank * step)))
    assert part.shape == here.weight.shape, (part.shape, here.weight.shape)
    return part


def lowrank_placement(p: torch.nn.Parameter) -> Shard:
    """FSDP2's ``shard_placement_fn`` for GaLore and APOLLO: 2-D weights with fewer rows than
    columns (projected on the left) split by columns where they split evenly, all others by
    rows."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Shard(1) if p.dim() == 2 and p.shape[0] < p.shape[1] and p.shape[1] % world == 0 else Shard(0)
