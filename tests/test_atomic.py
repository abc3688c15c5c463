"""Atomic writes: the new content, or the old one untouched, never half a file or a stray temp."""

import pytest

from loraflow.atomic import atomic_write


def test_writes_replace_and_failures_keep_the_old_file(tmp_path):
    target = tmp_path / "weights.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"old"))
    assert target.read_bytes() == b"old"

    def half_then_fail(tmp):
        open(tmp, "wb").write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]  # no temporary file left
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new"
