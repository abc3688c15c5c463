"""Run by test_fsdp.py under torchrun (gloo): every optimizer of ``VARIANTS`` trains a tiny
Llama sharded with FSDP2, each process on its slice of every global batch; the first
process saves each variant's final weights, gathered."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/ (for conftest's tiny models)
from conftest import tiny_llama  # noqa: E402

import loraflow as lf  # noqa: E402
from loraflow.distributed.parallel import parallelize  # noqa: E402
from loraflow.distributed.world import World  # noqa: E402

# (name, optimizer, per-layer updates, hidden size, steps): 8-bit states are quantized in
# blocks of 256 values of each shard, the same blocks as one process's where every shard
# holds whole blocks (hidden 512 on 2 processes). APOLLO-Mini's rank-1 estimate amplifies
# rounding (its moments divide projections near eps): two steps at a learning rate of 1e-3
# (its norm limiter acts from the second); test_fsdp.py compares its updates
VARIANTS = [
    ("adamw", "adamw", False, 32, 4),
    ("galore", "galore", False, 32, 4),
    ("galore-per-layer", "galore", True, 32, 4),
    ("apollo", "apollo", False, 32, 4),
    ("apollo-per-layer", "apollo", True, 32, 4),
    ("apollo-mini", "apollo-mini", False, 32, 2),
    ("apollo-mini-per-layer", "apollo-mini", True, 32, 2),
    ("galore8bit", "galore8bit", False, 512, 4),
    # projected on the other side than the shard keeps: stepped whole (gathered), sliced after
    ("galore-reverse", "galore-reverse", False, 32, 4),
    ("apollo-reverse", "apollo-reverse", False, 32, 4),
]


def global_batches(steps=4, size=12):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (size, 10), generator=g) for _ in range(steps)]


def make(optimizer, model):
    if optimizer.endswith("-reverse"):
        groups, build = make(optimizer.removesuffix("-reverse"), model)
        return [{**g, "proj_type": "reverse_std"} if "rank" in g else g for g in groups], build
    if optimizer == "adamw":
        return [{"params": list(model.parameters())}], lambda g: lf.GaLoreAdamW(g, lr=1e-2)
    if optimizer.startswith("galore"):
        cls = lf.GaLoreAdamW8bit if optimizer == "galore8bit" else lf.GaLoreAdamW
        return lf.galore_param_groups(model, rank=4, update_proj_gap=2), lambda g: cls(g, lr=1e-2)
    if optimizer == "apollo-mini":
        return lf.apollo_param_groups(model, rank=1, update_proj_gap=2), lambda g: lf.ApolloMini(g, lr=1e-3)
    return lf.apollo_param_groups(model, rank=4, update_proj_gap=2), lambda g: lf.Apollo(g, lr=1e-2)


def train(model, optimizer, per_layer, steps, rank=0, world=1, micro=1):
    """Process ``rank`` of ``world`` takes its slice of every global batch, in ``micro``
    micro-batches (one process with micro = N sums the N processes' slices' gradients as
    their all-reduce does)."""
    groups, build = make(optimizer, model)
    # per-layer: clipped by the whole model's gradient norm (lagged a step), summed over the shards
    opt = lf.PerLayerUpdates(model, build, groups, micro, max_grad_norm=0.05) if per_layer else build(groups)
    for x in global_batches(steps):
        for part in x.chunk(world)[rank].chunk(micro):
            (model(input_ids=part, labels=part).loss / micro).backward()
            if per_layer:
                opt.after_backward()
        if not per_layer:
            opt.step()
            opt.zero_grad()
    return model


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    world = World(rank, size, torch.device("cpu"), "fsdp")
    weights = {}
    for name, optimizer, per_layer, hidden, steps in VARIANTS:
        if optimizer == "galore8bit" and size != 2:
            continue
        model = train(parallelize(tiny_llama(hidden=hidden), world), optimizer, per_layer, steps, rank, size)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights.update({f"{name}/{k}": v.contiguous() for k, v in full.items()})
    if rank == 0:
        save_file(weights, sys.argv[1])
    dist.barrier()  # every process done before the group goes (gloo aborts on a torn-down peer)
    dist.destroy_process_group()
