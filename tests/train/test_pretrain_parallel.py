"""loraflow pretrain under torchrun on 2 CPU processes (gloo): DDP, and FSDP2 stopped after a sharded
checkpoint and resumed on another number of processes, train as one process on the global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_pretrain import ARGS

from loraflow.train.pretrain import main


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           "--master_addr=127.0.0.1", "-m", "loraflow.cli", "pretrain", *args]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def batch(n: int) -> list[str]:
    """ARGS with ``--batch n`` (ARGS' 4 sequences a step, over the processes)."""
    i = ARGS.index("--batch")
    return ARGS[: i + 1] + [str(n)] + ARGS[i + 2 :]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def weights(folder):
    return load_file(folder / "checkpoint" / "model.safetensors")


def test_ddp_and_fsdp_train_as_one_process_and_fsdp_resumes_on_another_count(tmp_path):
    # the one-process run tokenizes into the cache; every torchrun process reads it
    common = ["--optimizer", "galore", "--steps", "4", "--eval-every", "2"]
    common += ["--tokens-cache", str(tmp_path / "ids.safetensors")]
    one = main(batch(4) + common + ["--out", str(tmp_path / "one")])
    ddp = torchrun(2, batch(2) + common + ["--parallel", "ddp", "--out", str(tmp_path / "ddp")])
    # FSDP stopped after its first step (a sharded checkpoint: the weights whole, the optimizer's
    # state in a shard a process), finished by one process
    torchrun(2, batch(2) + common + ["--parallel", "fsdp", "--time-limit", "0", "--out", str(tmp_path / "split")])
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["processes"] == 2
    files = sorted(p.name for p in (tmp_path / "split" / "checkpoint").iterdir())
    assert "model.safetensors" in files and len([f for f in files if f.startswith("shard")]) == 2, files
    torchrun(1, batch(4) + common + ["--parallel", "fsdp", "--resume", "--out", str(tmp_path / "split")])

    reference = weights(tmp_path / "one")
    for run in ("ddp", "split"):
        got = weights(tmp_path / run)
        assert got.keys() == reference.keys()
        worst = max(rel_err(got[k], reference[k]) for k in reference)
        assert worst < 1e-5, (run, worst)
    (line,) = ddp.stdout.strip().splitlines()  # one summary line, from the first process, with the global batch's loss
    assert abs(json.loads(line)["eval_loss"] - one["eval_loss"]) < 1e-4
    log = [json.loads(line) for line in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_parallel_choices_refused_with_the_fix(tmp_path, monkeypatch):
    out = ["--steps", "1", "--out", str(tmp_path / "x")]
    cases = [
        (["--parallel", "fsdp", "--optimizer", "galore-adafactor"], "does not step FSDP shards"),
        (["--parallel", "ddp", "--optimizer", "galore"], "torchrun --nproc-per-node N"),  # not under torchrun
    ]
    for extra, words in cases:
        with pytest.raises(ValueError, match=words):
            main(ARGS + extra + out)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's 2 processes, each alone: refused
    with pytest.raises(ValueError, match="pass --parallel ddp or --parallel fsdp"):
        main(ARGS + ["--optimizer", "galore"] + out)
    assert not (tmp_path / "x").exists()
