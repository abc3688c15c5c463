"""Checkpoints that survive a kill at any point: the files go to ``checkpoint.tmp``, are
fsynced, and ``complete.json`` is written last; then ``checkpoint`` -> ``checkpoint.old``,
``checkpoint.tmp`` -> ``checkpoint``, and ``checkpoint.old`` is removed. Whatever a kill
leaves, ``latest_checkpoint`` finds the newest complete one (``pretrain`` and ``finetune``
resume from it)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from loraflow.atomic import atomic_write, fsync_dir, fsync_tree, publish_modes

MARKER = "complete.json"  # written last: {"step": N, "files": {name: size}}


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoint_paths(out: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, checkpoint.tmp, checkpoint.old) in ``out``."""
    return out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"


def checkpoint_step(folder: Path, required: tuple[str, ...], legacy: bool = False) -> int | None:
    """The step of the complete checkpoint in ``folder``, or None if it is missing or partial.

    Complete: ``complete.json`` present, every file it lists present with its size, and the
    ``required`` files among them. ``legacy``: a ``checkpoint`` folder from before the marker
    existed (pretrain's) counts as complete when its files are there (it was only ever made by
    renaming a finished folder) and its ``state.pt`` gives the step."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            step, sizes = int(info["step"]), dict(info["files"])
        except (ValueError, KeyError, TypeError):
            return None
        whole = all(
            (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items()
        )
        return step if whole and set(required) <= set(sizes) else None
    if legacy and folder.name == "checkpoint" and all((folder / name).is_file() for name in required):
        try:
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True, mmap=True)
            return int(state["step"])  # mmap: the optimizer state is not read
        except Exception:  # a damaged legacy file: not a checkpoint to resume from
            return None
    return None


def latest_checkpoint(out: Path, required: tuple[str, ...], legacy: bool = False) -> tuple[Path, int] | None:
    """The newest complete checkpoint in ``out`` and its step: ``checkpoint``, or, where a save
    was killed half way, ``checkpoint.tmp`` / ``checkpoint.old`` (on a tie, in that order)."""
    found = [
        (step, -i, folder)
        for i, folder in enumerate(checkpoint_paths(out))
        if (step := checkpoint_step(folder, required, legacy)) is not None
    ]
    if not found:
        return None
    step, _, folder = max(found)
    return folder, step


def save_checkpoint(out: Path, step: int, write: Callable[[Path], None], required: tuple[str, ...]) -> None:
    """Write ``out/checkpoint`` through ``write(folder)`` so that a kill at any point leaves a
    complete checkpoint, the previous one or this one. Leftovers of a killed save are settled
    first: the newest complete folder becomes ``checkpoint`` before anything older is deleted."""
    tmp = begin_checkpoint(out, required)
    write(tmp)
    commit_checkpoint(out, step, required)


def begin_checkpoint(out: Path, required: tuple[str, ...]) -> Path:
    """Settle what a killed save left and make an empty ``checkpoint.tmp`` (returned). Several
    processes (``distributed/checkpoint.py``): the first calls this, then all write."""
    final, tmp, old = checkpoint_paths(out)
    _settle(out, required)
    shutil.rmtree(tmp, ignore_errors=True)  # partial: `checkpoint` is the newest complete one
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(out: Path, step: int, required: tuple[str, ...]) -> None:
    """Seal ``checkpoint.tmp`` (fsync, then ``complete.json`` listing its files) and make it
    ``checkpoint``."""
    final, tmp, old = checkpoint_paths(out)
    publish_modes(tmp)  # safetensors writes 0600 files; the checkpoint is as readable as the rest
    fsync_tree(tmp)
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    assert set(required) <= set(sizes), f"the checkpoint holds {sorted(sizes)}, not all of {required}"
    with open(tmp / MARKER, "w") as f:
        json.dump({"step": step, "files": sizes}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def _settle(out: Path, required: tuple[str, ...]) -> None:
    """Leave the newest complete checkpoint at ``checkpoint`` and remove the other folders
    (older or partial). Each step keeps a complete copy of the newest on disk."""
    final, tmp, old = checkpoint_paths(out)
    newest = latest_checkpoint(out, required, legacy=True)
    if newest is not None and newest[0] != final:
        shutil.rmtree(final, ignore_errors=True)  # older or partial
        os.replace(newest[0], final)
        fsync_dir(out)
    for folder in (tmp, old):
        shutil.rmtree(folder, ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """Drop the records past ``step`` (those a run wrote after the checkpoint it resumes from)
    and a last line that a kill cut short; the file is replaced atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # cut short by a kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
