"""Fault injection: a save that fails or is killed at any rename leaves something whole.

Every rename (``os.replace``, ``loraflow.atomic.exchange``) and folder removal
(``shutil.rmtree``) of a save is a step; each test makes the n-th step fail, for every n:

* "raise": that step raises OSError and the code's own clean-up runs;
* "kill": that step raises ``Killed`` and no later step does anything, as if the process
  had died there (its clean-up never runs).

Then a reader must find the old version or the new one, whole; a later save must succeed
and leave no temporary folders.
"""

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import loraflow as lf
from loraflow import atomic
from loraflow.distributed.world import World
from loraflow.train.pretrain import checkpoint_paths, latest_checkpoint, main, save_checkpoint

DATA = Path(__file__).parents[2] / "examples" / "data" / "tinyshakespeare" / "input.txt"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """As tests/conftest.py's (this folder's conftest.py shadows that module's name)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).eval()


@torch.no_grad()
def randomize(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in lf.adapters.adapter_layers(model, name):
        for p in (layer.adapters[name].A, layer.adapters[name].B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


class Killed(BaseException):
    """The process dies here."""


@contextlib.contextmanager
def faults(at=None, mode="raise", exchange=True, probe=lambda: None):
    """Count the steps taken in the block (yields the list of (step name, probe()) pairs) and
    make step ``at`` fail as ``mode`` says. ``exchange=False``: as on a system without
    renameat2's exchange (ENOSYS), so the fallback's two renames run."""
    steps, dead = [], False
    real_exchange = atomic.exchange if exchange else _no_exchange
    real = {"replace": os.replace, "exchange": real_exchange, "rmtree": shutil.rmtree}
    points = ("replace", "exchange", "rmtree") if mode == "kill" else ("replace", "exchange")

    def step(name):
        def run(*args, **kwargs):
            nonlocal dead
            if dead:
                return None  # a dead process changes nothing
            if name in points:
                steps.append((name, probe()))
                if len(steps) == at:
                    if mode == "kill":
                        dead = True
                        raise Killed(f"killed at step {at} ({name})")
                    raise OSError(errno.EIO, f"injected failure at step {at} ({name})")
            return real[name](*args, **kwargs)

        return run

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "replace", step("replace"))
        m.setattr(atomic, "exchange", step("exchange"))
        m.setattr(shutil, "rmtree", step("rmtree"))
        yield steps


def _no_exchange(a, b):
    raise OSError(errno.ENOSYS, "renameat2 is not available on this system")


def test_the_real_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    atomic.exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())
    with pytest.raises(FileNotFoundError):
        atomic.exchange(tmp_path / "a", tmp_path / "missing")


# adapters ----------------------------------------------------------------------------------
def _version(r, alpha, seed):
    model = tiny_llama()
    lf.add_adapter(model, lf.LoRAConfig(r=r, alpha=alpha, target_modules=["q_proj", "v_proj"]), name="a")
    randomize(model, "a", seed=seed)
    return model


def _tensors(model, name):
    return {
        (m, s): t.detach().clone()
        for m, layer in lf.adapters.adapter_layers(model, name)
        for s, t in layer.adapters[name].file_tensors().items()
    }


V1, V2 = _version(r=2, alpha=4, seed=1), _version(r=4, alpha=16, seed=2)


def _which(folder):
    """'v1' or 'v2': what ``folder`` loads as, checked to be exactly that version."""
    model = tiny_llama()
    if folder.exists():
        lf.load_adapter(model, folder, name="x")
    else:
        with pytest.warns(UserWarning, match="interrupted"):
            lf.load_adapter(model, folder, name="x")
    config = lf.list_adapters(model)["x"]
    label, source = {(2, 4): ("v1", V1), (4, 16): ("v2", V2)}[(config.r, config.alpha)]
    got, want = _tensors(model, "x"), _tensors(source, "a")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (
        f"{folder} mixes versions: its config is {label}'s but its weights are not"
    )
    return label


@pytest.mark.parametrize("mode", ["raise", "kill"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_save_adapter_failing_at_every_step_leaves_v1_or_v2_whole(tmp_path, mode, exchange):
    folder = tmp_path / "a"
    lf.save_adapter(V1, folder)
    with faults(mode=mode, exchange=exchange) as counted:
        lf.save_adapter(V2, folder)
    n_steps = len(counted)
    # exchange, or (ENOSYS) exchange + two renames; killing also stops the old folder's removal
    assert n_steps == (1 if exchange else 3) + (mode == "kill")
    outcomes = []
    for n in range(1, n_steps + 1):
        lf.save_adapter(V1, folder)
        with pytest.raises(Killed if mode == "kill" else OSError, match="step"):
            with faults(at=n, mode=mode, exchange=exchange):
                lf.save_adapter(V2, folder)
        outcomes.append(_which(folder))
        if mode == "raise":  # its clean-up ran: nothing left over
            assert [p.name for p in tmp_path.iterdir()] == ["a"] and outcomes[-1] == "v1"
        lf.save_adapter(V2, folder)  # a later save succeeds and cleans up
        assert [p.name for p in tmp_path.iterdir()] == ["a"]
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert _which(folder) == "v2"
    if mode == "kill":  # killed after the swap: the new one stays
        assert outcomes[-1] == "v2" and "v1" in outcomes


def test_a_killed_fallback_swap_is_read_from_the_parked_folder(tmp_path):
    folder = tmp_path / "a"
    lf.save_adapter(V1, folder)
    with pytest.raises(Killed):
        with faults(at=3, mode="kill", exchange=False):  # exchange, target -> .a.old, then dead
            lf.save_adapter(V2, folder)
    assert not folder.exists() and (tmp_path / ".a.old").is_dir()
    assert _which(folder) == "v1"
    from loraflow.serve.registry import factors_for_bank

    shapes = {m: (layer.d_out, layer.d_in) for m, layer in lf.adapters.adapter_layers(V1, "a")}
    with pytest.warns(UserWarning, match="interrupted"):
        assert set(factors_for_bank(folder, shapes, r_max=8)) == set(shapes)


def test_save_adapter_refuses_to_replace_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="todo.txt.*another folder"):
        lf.save_adapter(V1, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        lf.save_adapter(V1, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]  # no temporary folder


def test_save_adapter_through_a_symlinked_folder_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    lf.save_adapter(V1, tmp_path / "link")
    lf.save_adapter(V2, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and _which(tmp_path / "real") == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# pretrain checkpoints ------------------------------------------------------------------------
def _train_step(model, opt):
    x = torch.randint(0, 128, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def two_steps():
    """A tiny model and AdamW: (model, optimizer, weights after step 1, step 2, step 3)."""
    model = tiny_llama().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weights = [_train_step(model, opt) for _ in range(3)]
    return model, opt, weights


def _check_resumable(out, weights, steps):
    """The checkpoint --resume would pick: complete, its step among ``steps``, its weights
    those of that step and its optimizer state loadable."""
    found = latest_checkpoint(out)
    assert found is not None, f"no complete checkpoint left in {sorted(p.name for p in out.iterdir())}"
    folder, step = found
    assert step in steps
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(saved[k], weights[step - 1][k]) for k in saved)
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["step"] == step
    model = tiny_llama()
    torch.optim.AdamW(model.parameters()).load_state_dict(state["optimizer"])
    return step


def _save(out, two_steps, step):
    model, opt, weights = two_steps
    model.load_state_dict(weights[step - 1])
    save_checkpoint(out, model, opt, step, World(0, 1, torch.device("cpu"), "none"), global_batch=4, last=False)


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_save_checkpoint_failing_at_every_step_keeps_a_complete_checkpoint(tmp_path, two_steps, mode):
    weights = two_steps[2]
    written = lambda out: (out / "checkpoint.tmp" / "complete.json").is_file()  # step 2 fully on disk
    _save(tmp_path / "count", two_steps, 1)
    with faults(mode=mode) as counted:
        _save(tmp_path / "count", two_steps, 2)
    assert len(counted) >= 2
    for n in range(1, len(counted) + 1):
        out = tmp_path / f"kill{n}"
        _save(out, two_steps, 1)
        with pytest.raises(Killed if mode == "kill" else OSError):
            with faults(at=n, mode=mode, probe=lambda: written(out)) as steps:
                _save(out, two_steps, 2)
        step = _check_resumable(out, weights, {1, 2})
        assert step == 2 or not steps[-1][1], "the finished step-2 checkpoint was lost"
        # a second failure, in the next save (which first settles what the first left)
        with faults(mode=mode) as recount:
            probe_out = tmp_path / f"probe{n}"
            shutil.copytree(out, probe_out)
            _save(probe_out, two_steps, 3)
        for m in range(1, len(recount) + 1):
            again = tmp_path / f"kill{n}-{m}"
            shutil.copytree(out, again)
            with pytest.raises(Killed if mode == "kill" else OSError):
                with faults(at=m, mode=mode):
                    _save(again, two_steps, 3)
            assert _check_resumable(again, weights, {step, 3}) >= step
            _save(again, two_steps, 3)  # then a save succeeds and tidies up
            assert sorted(p.name for p in again.iterdir()) == ["checkpoint"]
            assert _check_resumable(again, weights, {3}) == 3


def test_checkpoint_completeness(tmp_path, two_steps):
    final, tmp, old = checkpoint_paths(tmp_path)
    _save(tmp_path, two_steps, 1)
    assert latest_checkpoint(tmp_path) == (final, 1)
    (final / "complete.json").unlink()  # a checkpoint of an older loraflow: accepted
    assert latest_checkpoint(tmp_path) == (final, 1)
    shutil.copytree(final, tmp)  # a temporary folder without its marker: not
    (tmp / "state.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == (final, 1)
    _save(tmp_path, two_steps, 2)
    shutil.copytree(final, old)
    marker = json.loads((final / "complete.json").read_text())
    assert marker["step"] == 2 and set(marker["files"]) == {"model.safetensors", "state.pt", "config.json"}
    with open(final / "model.safetensors", "r+b") as f:  # truncated after the marker was written
        f.truncate(100)
    assert latest_checkpoint(tmp_path) == (old, 2)


TINY = [
    "--config",
    "tiny",
    "--optimizer",
    "adamw",
    "--warmup",
    "1",
    "--batch",
    "2",
    "--seq",
    "32",
    "--eval-seqs",
    "2",
    "--eval-every",
    "100",
    "--save-every",
    "2",
    "--device",
    "cpu",
]


def test_pretrain_killed_in_a_save_resumes(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(DATA.read_text()[:20000])
    out = tmp_path / "run"
    run = TINY + ["--data", str(data), "--out", str(out)]
    replaced = []

    def kill_second_swap_in(src, dst):  # the step-4 save: after checkpoint -> checkpoint.old
        replaced.append(Path(src).name)
        if replaced.count("checkpoint.tmp") == 2:
            raise Killed("killed between the two renames")
        return real(src, dst)

    real = os.replace
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "replace", kill_second_swap_in)
        with pytest.raises(Killed):
            main(run + ["--steps", "6"])
    final, tmp, old = checkpoint_paths(out)
    assert not final.exists() and latest_checkpoint(out) == (tmp, 4)
    with pytest.raises(ValueError, match="--resume.*another --out"):
        main(run + ["--steps", "6"])  # a fresh run would lose them: refused
    assert latest_checkpoint(out) == (tmp, 4) and old.is_dir()
    capsys.readouterr()
    main(run + ["--steps", "6", "--resume"])
    assert f"resuming from {tmp}, step 4" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
    assert latest_checkpoint(out) == (final, 6)
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_from_the_parked_checkpoint_alone(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(DATA.read_text()[:20000])
    out = tmp_path / "run"
    run = TINY + ["--data", str(data), "--out", str(out)]
    main(run + ["--steps", "2"])
    final, _, old = checkpoint_paths(out)
    os.rename(final, old)  # killed after checkpoint -> checkpoint.old
    main(run + ["--steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert f"resuming from {old}, step 2" in err
    assert latest_checkpoint(out) == (final, 3) and not old.exists()
