"""GaLore and APOLLO under DDP (2 CPU processes, gloo, torchrun), also with per-layer updates, equal
one process on the global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import rel_err, tiny_llama
from ddp_worker import VARIANTS, train
from safetensors.torch import load_file

HERE = Path(__file__).parent


def test_two_process_ddp_equals_one_process(tmp_path):
    """Every variant in one torchrun (one start of the two processes, not one a variant)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "--master_addr=127.0.0.1",
            str(HERE / "ddp_worker.py"),
            str(out),
            str(HERE.parent),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = load_file(out)
    start = tiny_llama().state_dict()
    for optimizer, per_layer in VARIANTS:
        variant = f"{optimizer}-{'per-layer' if per_layer else 'whole'}"
        single = train(tiny_llama(), optimizer=optimizer, per_layer=per_layer).state_dict()
        changed = 0
        for name, w in single.items():
            assert rel_err(ddp[f"{variant}/{name}"], w) < 1e-5, (variant, name)
            changed += int(not torch.equal(w, start[name]))
        assert changed > 10, variant
