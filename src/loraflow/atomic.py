"""Atomic writes: a file or folder that is replaced is either the old one or the new one,
never half written nor a mix of both (adapters, token caches, benchmark results)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Collection
from pathlib import Path


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``target``, flush it to
    disk, then rename it over ``target``; the temporary file is removed if anything fails.

    The file gets the permissions a plain ``open`` gives a new file, 0666 less the umask (0644
    under umask 022), not the private 0600 of mkstemp or of safetensors' own temporary files,
    so that a server running as another user can read what was written."""
    target = Path(target)
    tmp = _make_temp_file(target)
    try:
        write(tmp)
        publish_modes(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status);
    elsewhere set and reset at once (a thread creating a file just then would get 0o022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain
    ``open`` / ``mkdir`` gives: 0666 / 0777 less the umask (0644 / 0755 under umask 022).
    Writers such as safetensors' ``save_file`` make private 0600 files; an adapter or a model
    must stay readable by a server running as another user."""
    mask = umask()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for entry in os.scandir(path):
        publish_modes(entry.path)


def _make_temp_file(target: Path) -> str:
    """An empty new file ``.NAME.XXXXXXXX.tmp`` beside ``target``."""
    while True:
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return tmp


# Folders ------------------------------------------------------------------------------------
# A folder (an adapter: config + weights) is written whole into a hidden temporary folder
# beside it, ``.NAME.tmp-XXXX``, then swapped in. Every rename goes through ``os.replace`` and
# the Linux exchange through ``exchange``, so that tests can inject failures at each one.

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
# what renameat2 answers where the kernel, the C library or the file system lacks the exchange
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
# what link() answers where the file system has no hard links (FAT, some FUSE) or a file has too many
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def temp_prefix(target: str | os.PathLike) -> str:
    """The name prefix of the temporary folders that ``atomic_write_dir`` makes for ``target``."""
    return f".{Path(target).name}.tmp-"


def old_path(target: str | os.PathLike) -> Path:
    """Where the fallback swap parks ``target``'s previous contents: ``.NAME.old`` beside it.
    It exists only while a swap is under way, or after a process died in the middle of one
    (then ``target`` may be missing and this is the whole previous folder)."""
    target = Path(target)
    return target.parent / f".{target.name}.old"


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap the paths ``a`` and ``b`` (both must exist) in one atomic step: Linux's
    ``renameat2(RENAME_EXCHANGE)``. Raises OSError with errno ENOSYS where it is not available
    (another OS, an old C library) and EINVAL/EOPNOTSUPP where the kernel or file system lacks it."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system", str(a))
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed, removed) to disk; a no-op where
    folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is done anyway
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file in ``folder`` (not recursive), then the folder itself."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a whole folder through ``write(tmp_folder)`` and swap it in as ``target``: a
    reader sees the old folder or the new one, never a mix of their files.

    ``write`` fills a fresh temporary folder ``.NAME.tmp-XXXX`` beside ``target``; its files
    and the folder are fsynced, then it takes ``target``'s place:

    * no ``target`` yet: one ``os.replace``;
    * on Linux: ``exchange`` (atomic), then the previous contents, now under the temporary
      name, are removed;
    * where the exchange is unavailable: ``target`` -> ``.NAME.old`` (``old_path``), the new
      folder -> ``target``, then ``.NAME.old`` is removed. A process killed between the two
      renames leaves no ``target`` but a whole ``.NAME.old``; readers should look there
      (``recover_dir``) and the next write cleans up.

    The temporary folder is removed if anything fails. After a successful swap, leftovers of
    earlier writes that were killed (``.NAME.tmp-*``, ``.NAME.old``) are removed too, so two
    processes writing the same ``target`` at once are not supported (one of them may fail;
    ``target`` is whole either way). A symlinked ``target`` is followed: the folder it points
    to is replaced and the link stays. Returns the path written (``target``, links resolved).
    What ``write`` made gets the permissions of a plain ``open`` / ``mkdir`` (``publish_modes``).
    """
    return _write_dir(target, write, kept=set())


def _write_dir(target: str | os.PathLike, write: Callable[[Path], object], kept: set[str]) -> Path:
    """``atomic_write_dir``; the entries that ``write`` puts in ``kept`` are left as they are,
    the others get ``publish_modes``'s permissions."""
    target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(target)
    try:
        write(tmp)
        for entry in os.scandir(tmp):
            if entry.name not in kept:
                publish_modes(entry.path)
        os.chmod(tmp, 0o777 & ~umask())
        fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    _remove_leftovers(target)
    return target


def atomic_update_dir(target: str | os.PathLike, write: Callable[[Path], object], owned: Collection[str]) -> Path:
    """Replace the entries named in ``owned`` of the folder ``target`` (an adapter's files in a
    run folder that also holds its log and checkpoint) as one unit, keeping every other entry.

    ``atomic_write_dir`` with a temporary folder that first gets a hard link to each file of
    ``target`` not in ``owned`` (sub-folders are re-made and their files linked, symlinks
    re-made); then ``write(tmp_folder)`` adds the new owned files. An owned entry that
    ``write`` does not make is gone afterwards. A reader sees all the old owned files or all
    the new ones, never a mix, and the kept files stay the same files (the same inodes: a log
    held open for appending keeps growing in ``target``). Where the file system has no hard
    links, kept files are copied instead, and a file still held open then writes into the old
    copy. As with ``atomic_write_dir``, nothing else may write into ``target`` meanwhile: an
    entry made there during the swap would be lost. Returns the path written."""
    source = Path(os.path.realpath(target))
    owned, kept = set(owned), set()

    def fill(tmp: Path) -> None:
        if source.is_dir():
            for entry in os.scandir(source):
                if entry.name not in owned:
                    _keep(Path(entry.path), tmp / entry.name)
                    kept.add(entry.name)
        write(tmp)

    return _write_dir(source, fill, kept)


def _keep(src: Path, dst: Path) -> None:
    """Make ``dst`` the same as ``src``: a hard link to a file (a copy where links fail), a
    new folder holding the same for each entry (fsynced), the same symlink."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copymode(src, dst)
        for entry in os.scandir(src):
            _keep(Path(entry.path), dst / entry.name)
        fsync_dir(dst)
    else:
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            shutil.copy2(src, dst)


def _make_temp_dir(target: Path) -> Path:
    # not tempfile.mkdtemp: its folders are private (0700); this one becomes ``target``
    while True:
        tmp = target.parent / f"{temp_prefix(target)}{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    try:
        exchange(tmp, target)
    except OSError as e:
        if e.errno not in _NO_EXCHANGE:
            raise
    else:
        return  # the old contents are under tmp's name now
    old = old_path(target)
    if old.exists():  # from a swap that was killed: target is whole
        shutil.rmtree(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if not target.exists():
            with contextlib.suppress(OSError):
                os.replace(old, target)  # put the previous folder back
        raise


def _remove_leftovers(target: Path) -> None:
    ours = re.compile(rf"{re.escape(temp_prefix(target))}[0-9a-f]{{8}}|{re.escape(old_path(target).name)}")
    for entry in os.scandir(target.parent):
        if ours.fullmatch(entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)


def recover_dir(target: str | os.PathLike) -> Path | None:
    """The folder that stands for a missing ``target`` after a write was killed between the
    fallback's two renames: ``.NAME.old``, the whole previous folder, or None."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        return None
    old = old_path(target)
    return old if old.is_dir() else None
