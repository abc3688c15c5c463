"""Sharded checkpoints of an FSDP2 run: each process writes its own shards of the weights
and optimizer states as safetensors (``torch.distributed.checkpoint`` with its Hugging Face
storage), the first process a ``state.json`` manifest; a run on another number of processes
loads them, each reading the slices it now owns (DCP reshards).

The optimizer states of a sharded weight are DTensors split like it: AdamW's moments along
the weight's own dimension, GaLore's along the side the projection keeps, APOLLO's along
its channels; bases and APOLLO's norms are the same on every process (``state_shard_dim``
of each optimizer says which). 8-bit states are quantized in blocks of each shard, so they
are saved per process and resume only on the same number of processes.

The folder is sealed as any checkpoint is (``train/checkpoint.py``): written to
``checkpoint.tmp``, ``complete.json`` last, then renamed; a kill leaves the previous one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor as dtensor
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from loraflow.atomic import atomic_write
from loraflow.distributed.world import World
from loraflow.optim.per_layer import PerLayerUpdates
from loraflow.train import checkpoint

MANIFEST = "state.json"


def param_optimizers(opt, model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.optim.Optimizer]]:
    """(name, parameter, the optimizer that steps it) of every trained parameter."""
    if isinstance(opt, PerLayerUpdates):
        for name, o in opt.optimizers.items():
            yield name, o.param_groups[0]["params"][0], o
        return
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            yield names[id(p)], p, opt


def _shard_dim(p: torch.Tensor) -> int | None:
    return p.placements[0].dim if isinstance(p, DTensor) and isinstance(p.placements[0], Shard) else None


def as_shard(local: torch.Tensor, p: DTensor, dim: int, shape: list[int]) -> DTensor:
    """``local`` as this process's slice, along ``dim``, of a DTensor of ``shape`` on p's mesh."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local.contiguous(), p.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride
    )


def save_sharded(
    out: Path, step: int, model: nn.Module, opt, world: World, extra: dict, write_main: Callable[[Path], None]
) -> None:
    """Every process: its shards into ``out/checkpoint``; the first also ``state.json`` (step,
    scalars, how each state splits, ``extra``) and what ``write_main(folder)`` writes."""
    tmp = checkpoint.checkpoint_paths(out)[1]
    if world.main:
        checkpoint.begin_checkpoint(out, (MANIFEST,))
    world.barrier()
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    layout, flat = {}, {}
    for name, p, o in param_optimizers(opt, model):
        state, dim = o.state.get(p, {}), _shard_dim(p)
        for key, value in state.items():
            entry = f"optim.{name}.{key}"
            if not torch.is_tensor(value):
                layout[entry] = {"value": value}
                continue
            how = o.state_shard_dim(state, key, dim) if dim is not None else None
            info = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."), "dim": how}
            if how == "flat":  # this process's own blocks
                flat[entry] = info
                tensors[f"{entry}.rank{world.rank}"] = value.contiguous()
                continue
            if how is not None:
                shape = list(value.shape)
                shape[how] = p.shape[dim]  # the whole extent of the split dimension
                info["shape"] = shape
                value = as_shard(value, p, how, shape)
            layout[entry] = info
            tensors[entry] = value
    flats = [flat]
    if world.parallel != "none":
        flats = [None] * world.size
        dist.all_gather_object(flats, flat)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if world.main:
        manifest = {"step": step, "processes": world.size, "optim": layout, "flat": flats, **extra}
        if isinstance(opt, PerLayerUpdates):
            manifest["per_layer"] = {"micro": opt.micro, "steps": opt.steps, "last_grad_norm": opt.last_grad_norm}
        atomic_write(tmp / MANIFEST, lambda f: Path(f).write_text(json.dumps(manifest)))
        write_main(tmp)
    world.barrier()
    if world.main:
        checkpoint.commit_checkpoint(out, step, (MANIFEST,))
    world.barrier()


def load_sharded(folder: Path, model: nn.Module, opt, world: World) -> dict:
    """Load a ``save_sharded`` checkpoint into the (sharded) model and optimizer; returns the
    manifest. The number of processes may differ from the run that saved it, unless its
    optimizer states are 8-bit."""
    manifest = json.loads((folder / MANIFEST).read_text())
    layout, flats = manifest["optim"], manifest["flat"]
    if any(flats) and manifest["processes"] != world.size:
        raise ValueError(
            f"{folder} holds 8-bit optimizer states quantized per shard by {manifest['processes']} processes; "
            f"resume it on {manifest['processes']} processes (this run has {world.size})"
        )
    saved: dict[str, dict[str, dict]] = {}  # parameter name -> state key -> how it was saved
    for entry, info in layout.items():
        name, key = entry.removeprefix("optim.").rsplit(".", 1)
        saved.setdefault(name, {})[key] = info
    for entry, info in (flats[world.rank] if flats else {}).items():
        name, key = entry.removeprefix("optim.").rsplit(".", 1)
        saved.setdefault(name, {})[key] = {**info, "file_key": f"{entry}.rank{world.rank}"}
    trained = {name: (p, o) for name, p, o in param_optimizers(opt, model)}
    if set(saved) - set(trained):
        raise ValueError(
            f"{folder} has optimizer states for {sorted(set(saved) - set(trained))[:3]}, which this run does not "
            "train: resume with the model and optimizer settings of the run that saved it"
        )
    for name, keys in saved.items():  # a weight stepped whole then must be stepped whole now
        p, o = trained[name]
        was, now = "whole" in keys, hasattr(o, "steps_whole") and o.steps_whole(p)
        if was != now:
            raise ValueError(
                f"--resume: {folder} kept the optimizer states of {name} {'whole' if was else 'sharded'} "
                f"({manifest['processes']} processes) and this run would keep them {'whole' if now else 'sharded'} "
                f"(its columns split evenly over one count and not the other): resume on a number of processes "
                f"that divides the same dimensions, e.g. {manifest['processes']}"
            )
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    for name, keys in saved.items():
        p, _ = trained[name]
        for key, info in keys.items():
            if "value" in info:
                continue
            dtype = getattr(torch, info["dtype"])
            if info["dim"] is None or info["dim"] == "flat":
                template = torch.empty(info["shape"], dtype=dtype, device=world.device)
            else:
                template = dtensor.empty(
                    info["shape"], dtype=dtype, device_mesh=p.device_mesh, placements=[Shard(info["dim"])]
                )
            tensors[info.get("file_key", f"optim.{name}.{key}")] = template
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    set_model_state_dict(model, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    for name, keys in saved.items():
        p, o = trained[name]
        for key, info in keys.items():
            value = info["value"] if "value" in info else tensors[info.get("file_key", f"optim.{name}.{key}")]
            o.state[p][key] = value.to_local() if isinstance(value, DTensor) else value
    if isinstance(opt, PerLayerUpdates) and "per_layer" in manifest:
        counts = manifest["per_layer"]
        opt.micro, opt.steps, opt.last_grad_norm = counts["micro"], counts["steps"], counts["last_grad_norm"]
    return manifest
