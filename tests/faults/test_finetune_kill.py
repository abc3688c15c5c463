"""kill -9 during `loraflow finetune`: the run loses at most the steps since its last checkpoint,
nothing it saved is half-written, and --resume ends in the adapter of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def command(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loraflow.cli", "finetune", "--model", model, "--data", data, "--out", str(out),
            "--steps", "20", "--save-every", "4", "--dev-fraction", "0", "--batch-size", "4", "--max-length", "64",
            "--lr", "2e-3", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_smol, chat_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run beside the one to kill (one thread each, on 2 cores)
    errors = open(tmp_path / "whole.err", "w")
    whole = subprocess.Popen(command(tiny_smol, chat_file, tmp_path / "whole"), env=env, stdout=subprocess.DEVNULL,
                             stderr=errors)  # fmt: skip
    try:
        killed_and_resumed(tmp_path, tiny_smol, chat_file, env)
        assert whole.wait(timeout=300) == 0, (tmp_path / "whole.err").read_text()[-3000:]
    finally:
        if whole.poll() is None:
            whole.kill()
            whole.wait()
        errors.close()
    out = tmp_path / "killed"
    a, b = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(1, 21))  # the records past the checkpoint were dropped and redone


def killed_and_resumed(tmp_path: Path, model: str, data: str, env: dict) -> None:
    """The run killed (SIGKILL) after its step-8 checkpoint, then resumed to its end."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(model, data, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    marker = out / "checkpoint" / "complete.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if marker.is_file() and json.loads(marker.read_text() or "{}").get("step", 0) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads(marker.read_text())["step"]
    assert 8 <= step < 20
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # saved whole, at every checkpoint
        assert (out / name).is_file()
    load_file(out / "adapter_model.safetensors")

    subprocess.run(command(model, data, out, "--resume"), check=True, env=env, capture_output=True)
