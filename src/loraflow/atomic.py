"""Atomic file writes: a file that is replaced is either the old one or the new one, never
half written (adapters, token caches, benchmark results)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``target``, flush it to
    disk, then rename it over ``target``; the temporary file is removed if anything fails."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
