"""AdamW, GaLore, 8-bit GaLore, APOLLO and APOLLO-Mini (with and without per-layer updates,
and projected on the side the shard does not keep) stepping FSDP2 shards on 2 and 3 CPU
processes (gloo, torchrun) equal one process on the global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, tiny_llama
from fsdp_worker import VARIANTS, train
from safetensors.torch import load_file

HERE = Path(__file__).parent


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}", *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # once in a loaded full suite, a rank aborted as it exited ("terminate called without an
    # active exception": a C++ thread of gloo still running at exit), its work done; run again once
    if run.returncode != 0 and "terminate called without an active exception" in run.stderr:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return run


# 3: uneven shards (4 processes, once here too, added no case and 28 of the suite's seconds on 2 cores)
@pytest.mark.parametrize("processes", [2, 3])
def test_sharded_optimizers_equal_one_process(tmp_path, processes):
    out = tmp_path / "fsdp.safetensors"
    run = torchrun(processes, str(HERE / "fsdp_worker.py"), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = load_file(out)
    checked = 0
    for name, optimizer, per_layer, hidden, steps in VARIANTS:
        if optimizer == "galore8bit" and processes != 2:
            continue
        start = tiny_llama(hidden=hidden).state_dict()
        single = train(tiny_llama(hidden=hidden), optimizer, per_layer, steps, micro=processes).state_dict()
        # Looser where one process alone moves that much when only its micro-batching changes
        # (benchmarks/results/fsdp-tolerances-cpu.txt, from benchmarks/scripts/fsdp_tolerances.py):
        # 8-bit codes round (up to 7.8e-4); APOLLO-Mini's rank-1 estimate divides projections
        # near eps (up to 9.6e-4 of the update); GaLore's left basis of a 128 x 32 gradient
        # from a rank-32 Gram matrix (up to 1.6e-5)
        tolerance = {"galore8bit": 1e-3, "apollo-mini": 1e-2, "galore-reverse": 1e-4}.get(optimizer, 1e-5)
        moved = 0
        for key, w in single.items():
            got = sharded[f"{name}/{key}"]
            err = rel_err(got - start[key], w - start[key]) if optimizer == "apollo-mini" else rel_err(got, w)
            assert err < tolerance, (name, key, err)
            moved += int(not torch.equal(w, start[key]))
        assert moved == len(single), (name, moved)  # every weight trained
        checked += 1
    assert checked == len(VARIANTS) - (processes != 2)
