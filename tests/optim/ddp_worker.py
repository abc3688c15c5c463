"""Run by test_ddp.py under torchrun (2 processes, gloo): every variant of ``VARIANTS`` (GaLore or
APOLLO, whole or per-layer updates) trains with DDP, each process on half of every global
batch; rank 0 saves each variant's final weights, under ``optimizer-whole/`` or ``optimizer-per-layer/``."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv[2])  # tests/ (for conftest's tiny models)
from conftest import tiny_llama  # noqa: E402

import loraflow as lf  # noqa: E402

VARIANTS = [("galore", False), ("apollo", False), ("galore", True)]  # (optimizer, per-layer updates)


def global_batches(steps=4, size=4):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (size, 10), generator=g) for _ in range(steps)]


def train(model, rank=0, world=1, optimizer="galore", per_layer=False):
    """``per_layer``: each weight steps once its bucket's gradient is averaged (DDP's
    communication hook), clipped by the whole model's gradient norm."""
    inner = model.module if world > 1 else model
    if optimizer == "galore":
        groups = lf.galore_param_groups(inner, rank=4, update_proj_gap=2)
        make = lambda g: lf.GaLoreAdamW(g, lr=1e-2)
    else:  # APOLLO: every process draws the same projection from the same seed
        groups = lf.apollo_param_groups(inner, rank=4, update_proj_gap=2)
        make = lambda g: lf.Apollo(g, lr=1e-2)
    opt = lf.PerLayerUpdates(model, make, groups, max_grad_norm=0.05) if per_layer else make(groups)
    for x in global_batches():
        part = x.chunk(world)[rank]
        model(input_ids=part, labels=part).loss.backward()
        if per_layer:
            opt.after_backward()
        else:
            opt.step()
            opt.zero_grad()
    return model.module if world > 1 else model


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = {}
    for optimizer, per_layer in VARIANTS:
        model = train(DistributedDataParallel(tiny_llama()), rank, world, optimizer, per_layer)
        mode = "per-layer" if per_layer else "whole"
        weights.update({f"{optimizer}-{mode}/{k}": v.contiguous() for k, v in model.state_dict().items()})
    if rank == 0:
        save_file(weights, sys.argv[1])
    dist.barrier()  # every process done before the group goes (gloo aborts on a torn-down peer)
    dist.destroy_process_group()
