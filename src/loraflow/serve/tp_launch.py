"""``loraflow serve --tensor-parallel N``: N-1 worker processes (``torch.multiprocessing``,
spawned), one process group over the N (gloo on the CPU, NCCL on CUDA, rendezvous on a free
local port), and an engine on every rank built from the same ``EngineSpec``.

Rank 0 is the ``loraflow serve`` process (API, queue, engine rank 0); each worker builds its
engine, then follows rank 0's steps (``tensor_parallel.follow``) until ``stop`` ends them.
Workers are daemonic: they do not outlive the server, even when it fails.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loraflow.serve.llama import SHAPES, LlamaArgs
from loraflow.serve.tensor_parallel import TensorParallel, check_divisible, follow, stop_workers

TIMEOUT = timedelta(minutes=30)  # a collective that waits longer fails (rank 0 steps at least every minute)


@dataclass
class EngineSpec:
    """What every rank builds its engine from: the model folder (None: the embedded one) or a
    random-weights shape, and the Engine's keyword arguments (plain values)."""

    model: str | None
    random_weights: str | None = None
    engine: dict = field(default_factory=dict)

    def model_args(self) -> LlamaArgs:
        if self.random_weights:
            return LlamaArgs(**SHAPES[self.random_weights])
        from loraflow.models.loading import default_model_path

        folder = Path(self.model) if self.model else default_model_path()
        return LlamaArgs.from_hf(json.loads((folder / "config.json").read_text()))


def build_engine(spec: EngineSpec, device: str, tp: TensorParallel | None = None):
    from loraflow.serve.engine import Engine

    model, extra = spec.model, {}
    if spec.random_weights:  # benchmarks: a model shape with random weights, the same seed on every rank
        from loraflow.serve.llama import numbered_tokenizer, random_llama

        shape = LlamaArgs(**SHAPES[spec.random_weights])
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = random_llama(shape, dtype, "cpu" if tp else device)  # sharded, then moved, by the engine
        extra = dict(tokenizer=numbered_tokenizer(shape.vocab_size), model_name=spec.random_weights)
    return Engine(model=model, device=device, tensor_parallel=tp, **extra, **spec.engine)


def check_tensor_parallel(n: int, args: LlamaArgs, device: str, gpus: int) -> None:
    """A ValueError naming the fix for a size that cannot serve this model on this machine."""
    check_divisible(args, n)
    if device == "cuda" and n > gpus:
        raise ValueError(
            f"--tensor-parallel {n} needs {n} GPUs, one a rank, but {gpus} are visible: "
            f"use at most {gpus} (or make more visible with CUDA_VISIBLE_DEVICES)"
        )


def device_of(rank: int, device: str) -> str:
    return f"cuda:{rank}" if device == "cuda" else "cpu"


def join(rank: int, n: int, device: str) -> TensorParallel:
    """This process's rank in the group of ``n`` (MASTER_ADDR / MASTER_PORT from the environment)."""
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=n, timeout=TIMEOUT)
    return TensorParallel.of(dist.group.WORLD)


def worker(index: int, n: int, device: str, threads: int, spec: EngineSpec) -> None:
    """Rank index + 1: build the engine, follow rank 0's steps until it stops."""
    torch.set_num_threads(threads)
    tp = join(index + 1, n, device)
    engine = build_engine(spec, device_of(tp.rank, device), tp)
    follow(engine)
    engine.registry.close()
    dist.destroy_process_group()


def start(n: int, device: str, threads: int, spec: EngineSpec):
    """Spawn ranks 1..n-1, join as rank 0: (TensorParallel, the workers' ProcessContext)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)  # the workers inherit them
    workers = mp.start_processes(
        worker, args=(n, device, threads, spec), nprocs=n - 1, join=False, daemon=True, start_method="spawn"
    )
    return join(0, n, device), workers


def stop(tp: TensorParallel, workers, clean: bool) -> None:
    """End the workers: after a clean stop they leave their loops; else (rank 0 failed, the
    ranks may be mid-collective) they are terminated. Then the group goes."""
    if clean:
        stop_workers(tp)
        for p in workers.processes:
            p.join(timeout=30)
    for p in workers.processes:
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)
    dist.destroy_process_group()
