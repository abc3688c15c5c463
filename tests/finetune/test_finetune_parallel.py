"""lf.finetune under torchrun on 2 CPU processes (gloo): DDP and FSDP2 train the same adapter
as one process on the same rows, and a run killed after a checkpoint resumes on one process
(and not with another global batch)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.loop import finetune

WORKER = Path(__file__).parent / "finetune_worker.py"


def torchrun(n: int, settings: dict) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(WORKER), json.dumps(settings)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_ddp_and_fsdp_train_the_one_process_adapter_and_resume_on_one(tmp_path, tiny_smol, chat_file):
    base = dict(model=tiny_smol, data=chat_file, steps=4, save_every=2, dev_fraction=0.0, lr=2e-3, dropout=0.0,
                max_length=64, batch_size=2, progress=False, device="cpu")  # fmt: skip
    finetune(FinetuneConfig(**base, accumulation=2, out=str(tmp_path / "one")))  # 4 rows per step
    for name, extra in [
        ("ddp", {"parallel": "ddp"}),
        ("split", {"parallel": "fsdp", "activation_checkpointing": True, "crash_at": 2}),  # recomputing changes nothing
    ]:
        run = torchrun(2, {**base, **extra, "out": str(tmp_path / name)})  # 2 processes x 2 rows
        assert run.returncode == (1 if name == "split" else 0), run.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]  # killed after step 2's checkpoint
    # one process without the accumulation takes 2 rows a step, not the checkpoint's 4: refused,
    # nothing touched (the resume below still ends in the one-process adapter)
    with pytest.raises(ValueError, match="4 rows per tenant a step and this run takes 2"):
        finetune(FinetuneConfig(**base, resume=True, out=str(tmp_path / "split")))
    resumed = torchrun(
        1, {**base, "parallel": "fsdp", "accumulation": 2, "resume": True, "out": str(tmp_path / "split")}
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = load_file(tmp_path / "one" / "adapter_model.safetensors")
    one_log = [json.loads(line)["loss"] for line in open(tmp_path / "one" / "log.jsonl")]
    for name in ("ddp", "split"):
        got = load_file(tmp_path / name / "adapter_model.safetensors")
        assert got.keys() == reference.keys()
        worst = max(rel_err(got[k], reference[k]) for k in reference)
        assert worst < 1e-5, (name, worst)
        losses = [json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")]
        assert losses == pytest.approx(one_log, rel=1e-5)  # the global batch's loss, logged once
    run_json = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run_json["resolved"]["processes"] == 2
