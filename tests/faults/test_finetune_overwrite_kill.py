"""kill -9 during `loraflow finetune --overwrite`'s save: the output folder holds the previous
run's adapter whole or the new run's, never one run's weights with the other's config.

Each try is a real finetune process that kills itself (SIGKILL) at one instant of its first
adapter save (``kill_in_save.py``); the instants are sampled from those a whole save takes."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open

import loraflow as lf
from loraflow.adapters.files import read_adapter

HELPER = Path(__file__).with_name("kill_in_save.py")
OLD, NEW = {"r": 2, "alpha": 4.0}, {"r": 4, "alpha": 64.0}  # two runs told apart by their config
TRIES = 6


def finetune(model: str, data: str, out: Path, run: dict, kill_at: int, record: Path) -> int:
    """The return code of the run (-9: killed), its stderr's tail printed when it is not 0."""
    argv = ["finetune", "--model", model, "--data", data, "--out", str(out), "--steps", "1", "--dev-fraction", "0",
            "--batch-size", "2", "--max-length", "64", "--device", "cpu", "--no-progress", "--r", str(run["r"]),
            "--alpha", str(run["alpha"]), "--overwrite"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(lf.__file__).parents[1])}
    cmd = [sys.executable, str(HELPER), str(kill_at), str(record), "--", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        print(proc.stderr[-2000:])
    return proc.returncode


def digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def which_run(out: Path, old_weights: str) -> str:
    """'old' or 'new': the run whose whole adapter ``out`` holds; fails on a mix."""
    config = json.loads((out / "adapter_config.json").read_text())
    label = {(OLD["r"], OLD["alpha"]): "old", (NEW["r"], NEW["alpha"]): "new"}[(config["r"], config["lora_alpha"])]
    weights = out / "adapter_model.safetensors"
    with safe_open(weights, framework="pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_A.weight")}
    assert ranks == {config["r"]}, f"{out} mixes runs: {label} run's config, r={config['r']}, weights' ranks {ranks}"
    if label == "old":
        assert digest(weights) == old_weights, f"{out} has the old run's config with other weights"
    read_adapter(out)  # and the loader takes it
    return label


def test_kill_9_in_an_overwrite_save_leaves_one_run_whole(tmp_path, tiny_smol, chat_file):
    base = tmp_path / "old"
    assert finetune(tiny_smol, chat_file, base, OLD, 0, tmp_path / "unused") == 0
    old_weights = digest(base / "adapter_model.safetensors")

    counting = tmp_path / "count"
    shutil.copytree(base, counting)
    instants = tmp_path / "instants.txt"
    umask = os.umask(0o022)  # inherited by the run: its files must come out 0644, its folders 0755
    try:
        assert finetune(tiny_smol, chat_file, counting, NEW, 0, instants) == 0
    finally:
        os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json", "log.jsonl"):
        assert (counting / name).stat().st_mode & 0o777 == 0o644, name
    assert counting.stat().st_mode & 0o777 == 0o755
    assert which_run(counting, old_weights) == "new"
    n = len(instants.read_text().splitlines())
    assert n >= 2
    middle = random.Random(0).sample(range(2, n), min(n - 2, TRIES - 2))
    picks = sorted({1, n, *middle})  # the first instant, the last, and some between
    for k in picks:
        shutil.copytree(base, tmp_path / f"kill{k}")
    with ThreadPoolExecutor(2) as pool:  # two runs at a time: each is one thread (OMP_NUM_THREADS=1)
        codes = dict(zip(picks, pool.map(lambda k: finetune(tiny_smol, chat_file, tmp_path / f"kill{k}", NEW, k,
                                                            tmp_path / f"kill{k}.txt"), picks)))  # fmt: skip
    outcomes = {}
    for k in picks:
        assert codes[k] == -9, f"the run meant to die at instant {k} of {n} ended with {codes[k]}"
        outcomes[k] = which_run(tmp_path / f"kill{k}", old_weights)
    assert outcomes[1] == "old" and outcomes[n] == "new", outcomes  # killed before the swap / after it


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_finetune_outputs_are_readable_as_a_normal_open_makes_them(tmp_path, umask):
    """Files 0666 and folders 0777 less the umask (not mkstemp's private 0600)."""
    from loraflow.atomic import atomic_update_dir, atomic_write

    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "run.json", lambda tmp: Path(tmp).write_text("{}"))
        write = lambda d: (d / "adapter_config.json").write_text("{}")  # noqa: E731
        atomic_update_dir(tmp_path / "out", write, {"adapter_config.json"})
    finally:
        os.umask(previous)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "run.json") == 0o666 & ~umask
    assert mode(tmp_path / "out") == 0o777 & ~umask and mode(tmp_path / "out" / "adapter_config.json") == 0o666 & ~umask


@pytest.mark.parametrize("mode", ["raise", "kill"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_updating_an_adapter_in_a_run_folder_at_every_step_keeps_it_whole(tmp_path, mode, exchange):
    """``atomic_update_dir`` failing or killed at each rename / exchange / removal: the owned
    files are all old or all new, and the run's other files stay (the same inodes)."""
    from test_file_kills import Killed, faults

    from loraflow.atomic import atomic_update_dir, recover_dir

    owned = {"adapter_config.json", "adapter_model.safetensors"}

    def version(v):
        return lambda d: [(d / name).write_text(v) for name in owned]

    def check(out):
        found = recover_dir(out) or out
        assert {(found / name).read_text() for name in owned} in ({"old"}, {"new"})
        assert (found / "log.jsonl").stat().st_ino == log_inode and (
            found / "checkpoint" / "state.pt"
        ).read_text() == "s"
        return (found / "adapter_config.json").read_text()

    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_text("s")
    (out / "log.jsonl").write_text("{}\n")
    log_inode = (out / "log.jsonl").stat().st_ino
    atomic_update_dir(out, version("old"), owned)
    with faults(mode=mode, exchange=exchange) as counted:
        atomic_update_dir(out, version("new"), owned)
    outcomes = []
    for n in range(1, len(counted) + 1):
        atomic_update_dir(out, version("old"), owned)
        with pytest.raises(Killed if mode == "kill" else OSError, match="step"):
            with faults(at=n, mode=mode, exchange=exchange):
                atomic_update_dir(out, version("new"), owned)
        outcomes.append(check(out))
        if not out.exists():  # killed between the fallback's two renames: finetune's prepare puts it back
            os.replace(recover_dir(out), out)
        atomic_update_dir(out, version("new"), owned)  # a later save succeeds and cleans up
        assert [p.name for p in tmp_path.iterdir()] == ["out"] and check(out) == "new"
    assert outcomes[0] == "old"


def test_a_run_folder_parked_by_a_killed_fallback_swap_is_put_back(tmp_path):
    """Without the atomic exchange, a kill between the swap's two renames leaves no OUT but a
    whole ``.OUT.old``: the next finetune on OUT (here --overwrite's checks) renames it back."""
    from loraflow.atomic import old_path
    from loraflow.finetune.config import FinetuneConfig
    from loraflow.finetune.outputs import RunFolder

    out = tmp_path / "out"
    parked = old_path(out)
    parked.mkdir()
    (parked / "adapter_config.json").write_text("{}")
    (parked / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a fine-tuned adapter"):  # seen as OUT: not lost
        RunFolder(out, FinetuneConfig(out=str(out), data="train.jsonl")).prepare()
    assert (out / "adapter_config.json").is_file() and not parked.exists()
