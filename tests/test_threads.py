"""Every command picks PyTorch's CPU threads the way ``serve`` does (``loraflow/threads.py``):
--threads N, else $OMP_NUM_THREADS, else one fewer than the physical cores."""

import importlib

import pytest
import torch

from loraflow.cli import main
from loraflow.threads import default_threads

# by module path: ``loraflow.finetune`` is also the name of the function the package exports
finetune_loop = importlib.import_module("loraflow.finetune.loop")
eval_command = importlib.import_module("loraflow.evaluate.command")
pretrain = importlib.import_module("loraflow.train.pretrain")


@pytest.fixture
def threads(monkeypatch):
    """The command's heavy part replaced by one that records the threads it ran with."""
    seen = []
    before = torch.get_num_threads()

    def record(*args, **kw):
        seen.append(torch.get_num_threads())
        return {}

    class World:
        device = torch.device("cpu")

        def barrier(self):
            pass

    monkeypatch.setattr(finetune_loop, "finetune", record)
    monkeypatch.setattr(eval_command, "causal_lm", record)
    monkeypatch.setattr(pretrain, "start", lambda parallel, device: World())
    monkeypatch.setattr(pretrain, "stop", lambda world: None)
    monkeypatch.setattr(pretrain, "_train", record)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield seen
    torch.set_num_threads(before)


COMMANDS = {
    "finetune": ["finetune", "--data", "x.jsonl", "--out", "y", "--device", "cpu"],
    "eval": ["eval", "--data", "x.jsonl", "--out", "y", "--device", "cpu"],
    "pretrain": ["pretrain", "--data", "x", "--out", "y", "--device", "cpu"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_share_the_servers_thread_choice(threads, monkeypatch, command, capsys):
    torch.set_num_threads(max(2, default_threads() + 1))
    main(COMMANDS[command])
    main([*COMMANDS[command], "--threads", "3"])
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    main(COMMANDS[command])
    assert threads == [default_threads(), 3, 2]


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_below_one_are_refused(threads, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main([*COMMANDS["finetune"], "--threads", value])
    assert exit_.value.code == 2 and "argument --threads: must be a whole number >= 1" in capsys.readouterr().err
