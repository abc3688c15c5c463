"""PyTorch's CPU threads for every command (``serve``, ``finetune``, ``eval``, ``pretrain``):
one fewer than the physical cores unless ``--threads N`` or $OMP_NUM_THREADS says otherwise.

PyTorch's OpenMP threads spin while they wait for each other, so when another process wants
the same cores one descheduled thread holds up its whole team. On 2 cores, beside a 2-thread
matmul loop, a 20-token completion of SmolLM2-135M from ``loraflow serve`` took 31-64 s with
2 threads against 1.2-3.2 s with 1 (1.0-1.2 s either way on idle cores); issue 23 reported a
``finetune`` step taking 36-51 s with PyTorch's default threads while another process used a
core, against 1.6-1.9 s with OMP_NUM_THREADS=1. OMP_WAIT_POLICY=PASSIVE
would stop the spinning, but OpenMP reads it when torch is imported, before a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

THREADS_HELP = (
    "PyTorch's CPU threads (default: on the CPU one fewer than the physical cores, at least 1, "
    "unless $OMP_NUM_THREADS is set; on CUDA PyTorch's own)"
)


def physical_cores() -> int:
    """The cores this process may run on, a core's hyper-threads counted once (Linux; elsewhere
    the CPU count)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text())
        except OSError:
            cores.add(cpu)
    return len(cores)


def default_threads() -> int:
    """One fewer than the physical cores, at least one: the spare core serves the HTTP thread,
    the data loading, or whatever else runs on the machine."""
    return max(1, physical_cores() - 1)


def configure_threads(threads: int | None, device: str, command: str = "serve") -> int:
    """Set PyTorch's intra-op threads before the model is built: ``threads`` when given; else
    ``default_threads()`` on the CPU unless $OMP_NUM_THREADS chose, and PyTorch's own default
    on CUDA (the GPU does the work). Returns the number in use."""
    import torch

    if threads is not None:
        if threads < 1:
            sys.exit(f"loraflow {command}: --threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    elif str(device).split(":")[0] == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def thread_count(text: str) -> int:
    """--threads: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=thread_count, metavar="N", help=THREADS_HELP)
