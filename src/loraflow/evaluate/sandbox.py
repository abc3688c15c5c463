"""Run one untrusted Python program in a separate, confined process and say how it ended.

Generated code is executed, never imported: each program runs in a fresh ``python -I -B``
process (a clean environment, stdin at end-of-file, its own session, a scratch directory as
its working directory and home, removed afterwards). A bootstrap (``_sandbox_bootstrap.py``)
confines it, then runs it. The guarantees come from the kernel, by construction, not from
checking Python calls one by one; each mechanism is used where the kernel allows it, and
``Outcome.confinement`` names those that held a run (``run_program`` warns once, saying what
is lost, where landlock-files, pid-namespace or kill-by-uid, or process-limit is missing):

- ``landlock-files``: landlock lets the program create, write, truncate, remove, rename or
  link files, and make directories, fifos, sockets and symlinks, only beneath its scratch
  directory (plus writing /dev/null); device nodes nowhere. The kernel checks the file, so
  ``dir_fd``, ``opener``, ``/proc/self/fd`` and links get no further than a plain ``open``.
  ``landlock-network``: no TCP bind or connect; ``landlock-scope``: signals and abstract unix
  sockets reach only the program's own processes;
- ``pid-namespace``: the program runs under an init process of its own, and when it ends (or
  the time limit kills it) the kernel kills every process left in the namespace, including
  children that called ``setsid()``; ``network-namespace`` (only a loopback that is down) and
  ``ipc-namespace``. Without a PID namespace but as root (a container without
  CAP_SYS_ADMIN, say), ``kill-by-uid``: once the program ends, a process of its uid sends
  SIGKILL to every process of that uid and reaps them (not at the time limit, where the
  parent kills the process group: a ``setsid()`` child then survives);
- ``unprivileged-user``: a root process drops to a uid and gid of the run's own (2**31 plus
  the bootstrap's pid; nobody where that uid is not mapped), with no groups and no capability
  but CAP_DAC_READ_SEARCH (so the interpreter's own files stay readable, under a 0700 /root
  say); hence ``process-limit``: 64 processes and threads (RLIMIT_NPROC, which root ignores;
  without root it is counted in a user namespace, ``user-namespace``);
- no_new_privs (no setuid program gives privileges back), and resource limits: address
  space (``memory_mb``), CPU seconds (the wall-clock limit plus one), file size (64 MiB), no
  core dumps. The parent enforces the wall-clock limit.

A program passes only by running to its last line: the bootstrap then copies a random per-run
nonce, which waits in a pipe (not in the interpreter) until then, to a report pipe the parent
reads. An exception, ``exit()``, ``os._exit()``, or an exit reached through the bootstrap's
own frames before the end fails the program, so an early exit cannot skip the tests appended
after a candidate solution.

On top, as defence in depth and for a clear "blocked" status, an audit hook
(``sys.addaudithook``, installed before the program's first line) ends the program at once on
a socket connect, bind, send or name lookup; starting a process or forking (unless
``allow_fork``); opening a file for writing, or removing, renaming, linking, chmod-ing a path,
outside the scratch directory; signalling a process outside its own process group;
``ctypes``, ``_posixsubprocess`` and the ``gc`` calls that reach other objects' internals.

What it does not confine, honestly: reading. Files anywhere that the interpreter could read
stay readable (CAP_DAC_READ_SEARCH), and /proc is the machine's, so other processes' pids and
command lines are visible (not their memory or environment). A pathname unix socket that
anyone may connect to, and UDP where there is no network namespace (landlock knows TCP only),
are left to the audit hook. The pass verdict can be forged by a program
written against this harness (it can read the nonce pipe and write the report itself), as it
could return objects whose ``__eq__`` is always true to its tests: the nonce stops exits that
skip the tests, not a program aimed at the harness. Without landlock, writes outside the
scratch directory rest on file permissions (as the run's own uid: world-writable places such
as /tmp stay open) and the hook; without a PID namespace, only children still in the
program's process group are killed, unless ``kill-by-uid``; without root or user namespaces,
there is no process limit. CPU time and memory are limited per process, not per run, and
disk only per file. Honest programs lose little: /dev/shm is not writable (multiprocessing's
locks, which the hook refused anyway) and 64 counts threads too. Run code from an adversary
in a container or VM as well.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "blocked"]
BLOCKED_EXIT = 86  # the bootstrap's exit code for an action the audit hook refused
MEMORY_EXIT = 87  # ... and for a MemoryError that ended the program
DETAIL_BYTES = 2048  # how much of the program's output (the end of it) an Outcome keeps
DRAIN_S = 0.5  # after the program ends, how long to wait for output still in the pipe
BOOTSTRAP = Path(__file__).with_name("_sandbox_bootstrap.py")
# what a run loses without any of these kernel mechanisms (run_program warns once for each)
ESSENTIAL = {
    ("landlock-files",): "writes outside the scratch directory rest on file permissions and the audit hook",
    ("pid-namespace", "kill-by-uid"): "a child that leaves the program's process group (setsid) can outlive it",
    ("process-limit",): "the number of processes is not limited (root ignores RLIMIT_NPROC)",
}
_warned: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Outcome:
    """How one program ended: its status, the end of its output (with a line saying why, for
    anything but a clean run), and its wall-clock time. ``confinement`` names the kernel
    mechanisms that held it (see the module docstring); it is left out of comparisons."""

    status: Status
    detail: str
    seconds: float
    confinement: tuple[str, ...] = field(default=(), compare=False)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024, *, allow_fork: bool = False) -> Outcome:
    """Run ``source`` in a fresh, limited Python process (see the module docstring).

    ``timeout_s`` is the wall-clock limit, ``memory_mb`` the address-space limit; forking is
    refused unless ``allow_fork`` (then up to 64 processes where the kernel gives a process
    limit; starting other programs is refused always). Every process the program started is
    dead when this returns where the kernel gives a PID namespace (``Outcome.confinement``)."""
    _check_limits(timeout_s, memory_mb)
    if not isinstance(source, str):
        raise ValueError(f"source must be the program's text (a str), got {type(source).__name__}")
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="loraflow-sandbox-"))
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    report_r, report_w = os.pipe()
    open_fds = [nonce_r, nonce_w, report_r, report_w]  # each closed once: another thread may reuse the numbers
    try:
        os.write(nonce_w, nonce)  # 32 bytes: the pipe holds them
        open_fds.remove(nonce_w)
        os.close(nonce_w)
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        cpu_s = math.ceil(timeout_s) + 1
        argv = [sys.executable, "-I", "-B", "-X", "utf8", str(BOOTSTRAP), scratch, "program.py"]
        argv += [str(memory_mb * 2**20), str(cpu_s), "1" if allow_fork else "0", str(nonce_r), str(report_w)]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=scratch,
            env=_child_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(nonce_r, report_w),
        )
        open_fds.remove(report_w)
        os.close(report_w)
        with proc:
            output, timed_out = _collect(proc, start + timeout_s)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        confinement, finished = _read_report(report_r, nonce)
        if confinement is not None:
            _warn_if_missing(confinement)
        cpu_out = usage.ru_utime + usage.ru_stime >= cpu_s - 0.1
        outcome = _outcome(proc.returncode, finished, output, timed_out, seconds, timeout_s, cpu_out)
        return dataclasses.replace(outcome, confinement=confinement or ())
    finally:
        for fd in open_fds:
            os.close(fd)
        _remove(scratch)


def run_programs(
    sources: list[str],
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    *,
    allow_fork: bool = False,
) -> list[Outcome]:
    """``run_program`` for each source, ``workers`` at a time (default: one per CPU core),
    each in its own process; the outcomes in the order of ``sources``."""
    _check_limits(timeout_s, memory_mb)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (or None: one per CPU core), got {workers!r}")
    sources = list(sources)
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb, allow_fork=allow_fork), sources))


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"memory_mb must be an integer >= 64 (Python itself needs some), got {memory_mb!r}")


def _child_env(scratch: str) -> dict[str, str]:
    """A minimal environment: nothing of the evaluating process's (tokens, proxies) leaks in."""
    return {
        "PATH": os.defpath,
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }


def _collect(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
    """Read the program's output (keeping its last ``DETAIL_BYTES``) until it has ended and
    the pipe is drained; kill its process group at the deadline, and once it has ended (its
    leftover children). Returns the output and whether the deadline killed it."""
    fd = proc.stdout.fileno()
    tail, eof, ended, timed_out, drain_until = bytearray(), False, False, False, math.inf
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            if not eof and sel.select(timeout=0.02):
                chunk = os.read(fd, 65536)
                eof = not chunk
                tail += chunk
                del tail[:-DETAIL_BYTES]
            elif eof:
                time.sleep(0.01)
            now = time.monotonic()
            if not ended and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                ended, drain_until = True, now + DRAIN_S
                _kill_group(proc.pid)  # still a zombie, so its group id cannot have been reused
            elif not ended and now >= deadline and not timed_out:
                timed_out = True
                _kill_group(proc.pid)
            if ended and (eof or now >= drain_until):
                return bytes(tail), timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(fd: int, nonce: bytes) -> tuple[tuple[str, ...] | None, bool]:
    """What the bootstrap wrote to its report pipe: the mechanisms that confined the program (the
    first line, written before the program's first line; None if the bootstrap ended before),
    and whether the nonce followed it, as the bootstrap writes it after the program's last line.
    Read once the program has ended."""
    os.set_blocking(fd, False)  # without a PID namespace, a leftover child may still hold the pipe open
    report = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        report += chunk
    head, _, rest = bytes(report).partition(b"\n")
    if not head.startswith(b"confined:"):
        return None, False
    return tuple(head[len(b"confined:") :].decode("ascii", "replace").split()), rest == nonce


def _warn_if_missing(confinement: tuple[str, ...]) -> None:
    for mechanisms, loss in ESSENTIAL.items():
        if not set(mechanisms) & set(confinement) and mechanisms not in _warned:
            _warned.add(mechanisms)
            missing = " or ".join(mechanisms)
            warnings.warn(f"loraflow sandbox: this machine gives no {missing}: {loss}", RuntimeWarning, stacklevel=3)


def _outcome(
    rc: int, finished: bool, output: bytes, timed_out: bool, seconds: float, timeout_s: float, cpu_out: bool
) -> Outcome:
    text = output.decode("utf-8", "replace").strip()
    if timed_out:
        status, why = "timeout", f"ran past the {timeout_s:g} s limit and was killed"
    elif rc == 0 and finished:
        status, why = "passed", ""
    elif rc == 0:
        status, why = (
            "failed",
            (
                "ended with status 0 before its last line (without the sandbox's end-of-program mark): only a "
                "program that runs to its end passes"
            ),
        )
    elif rc == BLOCKED_EXIT:
        status, why = "blocked", "stopped by the sandbox"
    elif rc == MEMORY_EXIT or (rc != 1 and "MemoryError" in text):
        status, why = "memory", "ran out of memory (over its address-space limit)"
    elif rc in (-signal.SIGXCPU, -signal.SIGKILL) and cpu_out:
        status, why = "timeout", "used up its CPU-time limit and was killed"
    elif rc == -signal.SIGKILL:
        status, why = "memory", "killed by SIGKILL: most likely the kernel's out-of-memory killer"
    elif rc < 0:
        status, why = "failed", f"crashed with signal {signal.strsignal(-rc) or -rc}"
    else:
        status, why = "failed", f"exited with status {rc}"
    detail = f"{why}\n{text}".strip() if why else text
    return Outcome(status, detail[-DETAIL_BYTES:], seconds)


def _remove(scratch: str) -> None:
    """Remove the scratch directory, even where the program took away its own permissions."""

    def retry(func, path, _exc_info):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(scratch, onerror=retry)
