"""A model made data-parallel: DDP (every process holds all weights, gradients averaged) or
FSDP2 (Zhao et al., "PyTorch FSDP", VLDB 2023; ``fully_shard``): each decoder block's
parameters sharded over the processes, gathered for its forward and backward, gradients
reduce-scattered, so weights, gradients and optimizer states take 1/N of the memory each.

Weights are sharded with ``lowrank_placement`` (rows, or columns for weights that GaLore and
APOLLO project on the left), so those optimizers' projections stay local
(``optim/sharded.py``). bf16-mixed under FSDP: float32 shards, bfloat16 gathers and
compute, float32 gradient reduction (``MixedPrecisionPolicy``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from loraflow.distributed.world import World
from loraflow.optim.sharded import lowrank_placement


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a Hugging Face decoder (``model.model.layers`` for Llama)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers to shard")


def parallelize(model: nn.Module, world: World, bf16_mixed: bool = False, root: bool = True) -> nn.Module:
    """``model`` (already on ``world.device``) wrapped for ``world.parallel``. ``root=False``
    (FSDP): only the decoder blocks are sharded; the rest (embeddings, final norm, heads) stays
    whole on every process, so code may call the body and the head directly (fine-tuning's
    chunked losses do), and its gradients are averaged by ``average_gradients``."""
    if world.parallel == "none":
        return model
    if world.parallel == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_mixed else None
    kw = dict(shard_placement_fn=lowrank_placement, **({"mp_policy": mp} if mp else {}))
    for block in decoder_blocks(model):
        fully_shard(block, **kw)
    if root:
        fully_shard(model, **kw)  # the rest: embeddings, final norm, head
    return model


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    """Average over the processes the gradients of the whole (not sharded) ``params``: one
    all-reduce of them flattened (adapters and heads: megabytes). FSDP's shards are averaged
    by FSDP itself and skipped here."""
    if world.parallel == "none":
        return
    whole = [p for p in params if not isinstance(p, DTensor)]
    for p in whole:
        if p.grad is None:  # every process sends the same layout
            p.grad = torch.zeros_like(p)
    if not whole:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in whole])
    dist.all_reduce(flat)
    flat /= world.size
    for p, g in zip(whole, flat.split([p.numel() for p in whole])):
        p.grad.copy_(g.view_as(p.grad))


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every FSDP-sharded module of ``model`` whole for the duration (all-gathered on every
    process; a collective), to read its weights (saving adapters); sharded again after."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself (DDP wraps it; FSDP2 shards it in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, last_micro_batch: bool):
    """A context for one micro-batch's backward: gradients are averaged over the processes
    only on the last micro-batch of a step (accumulated locally before it)."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()
