"""The sandbox's child process (``sandbox.run_program`` starts it; never imported): confine, then run one program.

    python -I -B -X utf8 _sandbox_bootstrap.py SCRATCH PROGRAM MEMORY CPU FORK NONCE_FD REPORT_FD

What the kernel enforces here, each where it allows it (``run_program`` says which in ``Outcome.confinement``):

- namespaces, set up as root or in a new user namespace (non-root): a PID namespace (``pid-namespace``): the
  program runs under a small init process of its own, whose end makes the kernel kill every process left in
  the namespace, ``setsid()`` or not; a network namespace (``network-namespace``, only a loopback that is down)
  and an IPC one (``ipc-namespace``: no System V or POSIX message queues shared with the machine). Without a
  PID namespace, as root (``kill-by-uid``): once the program ends, a process of its uid kills all of that uid
  (not when the time limit kills the bootstrap's process group: a setsid() child then survives);
- landlock (``landlock-files``): creating, writing, truncating, removing, renaming or linking files, and making
  fifos, sockets or symlinks, only beneath the scratch directory (and writing ``/dev/null``); device nodes
  nowhere. It holds for every way to name a path (``dir_fd``, an ``opener``, ``/proc/self/fd``, links), since
  the kernel checks the file, not the call. Where landlock is new enough: no TCP bind or connect
  (``landlock-network``), and signals and abstract unix sockets only within the sandbox (``landlock-scope``);
- as root, the program drops to an unprivileged user of its own (``unprivileged-user``: uid and gid
  2**31 + this process's pid, no supplementary groups; 65534, nobody, where that uid is not mapped), keeping
  only CAP_DAC_READ_SEARCH so that the interpreter's files stay readable wherever they are (under a 0700
  /root, say). So the process limit holds (``process-limit``, 64 processes and threads, which root ignores;
  in a user namespace it counts there), and mounts, raw sockets, kernel modules, clocks and the rest of
  root's powers are gone;
- no_new_privs (setuid programs give nothing), and resource limits: address space, CPU seconds, file size,
  no core dumps.

How it ended is not the exit status alone: the program passes only if, after its last line, this bootstrap
copies a per-run nonce from NONCE_FD to REPORT_FD. The nonce waits in the kernel's pipe buffer, not in the
interpreter, until then, so an exit the program reaches early, through the bootstrap's own frames or functions
or an exception in its reporting, ends without it and fails. The residual: a program written against this
harness can read NONCE_FD and write REPORT_FD itself (as it could fool its tests by returning an object whose
``__eq__`` is always true): the nonce stops exits that skip the tests, not a program that targets the harness.

Python's audit hook (``sys.addaudithook``) stays on top, as defence in depth and for the clear "blocked"
verdict: it ends the program on network use, process starts (and forks, unless allowed), writes outside the
scratch directory, signals outside its process group, ctypes and interpreter internals.
"""

import builtins
import ctypes
import os
import posix
import resource
import signal
import sys
import traceback
import types

BLOCKED_EXIT = 86  # the exit code for an action the audit hook refused (sandbox.py knows it too)
MEMORY_EXIT = 87  # ... and for a MemoryError that ended the program
FILE_LIMIT = 64 * 2**20
PROCESS_LIMIT = 64
OWN_UID_BASE = 2**31  # the program's uid is this plus the bootstrap's pid: unique among live sandboxes
NOBODY = 65534

CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 8, 36, 38
CAP_DAC_READ_SEARCH = 2
# landlock's system calls have these numbers on every architecture; its access rights, by the ABI that added them
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR, FS_MAKE_REG = (
    1 << b for b in (1, 4, 5, 6, 7, 8)
)
FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = (1 << b for b in (9, 10, 11, 12))
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def call(name, *args):
    """A libc function or system call; an OSError where it fails."""
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if getattr(libc, name)(*args) < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


# --- the namespaces and the init process ---------------------------------------------------------------------------


def unshare_namespaces():
    """The namespaces this kernel lets the bootstrap have, by name. Without root, a user namespace first."""
    got = []
    if os.geteuid() != 0:
        try:
            call("unshare", CLONE_NEWUSER)
            got.append("user-namespace")
        except OSError:
            return got
    for flag, name in (
        (CLONE_NEWPID, "pid-namespace"),
        (CLONE_NEWNET, "network-namespace"),
        (CLONE_NEWIPC, "ipc-namespace"),
    ):
        try:
            call("unshare", flag)
            got.append(name)
        except OSError:
            pass
    return got


def wait_for(pid):
    """Wait for the child ``pid``, reaping any other child on the way (an init process inherits orphans); its
    end as ``os.waitstatus_to_exitcode`` gives it (a signal s as -s)."""
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            return os.waitstatus_to_exitcode(status)


def end_as(code):
    """End this process as a child that ended with ``code`` did (a signal s as -s, or as 128 + s where an init
    process, which cannot signal itself, passed it on), so that the parent sees the program's own end."""
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, say: it has no handler to reset
            pass
        os.kill(os.getpid(), sig)
    os._exit(code if 0 <= code < 128 else 1)


def enter_pid_namespace():
    """Fork twice: this process waits outside the namespace, its child is the namespace's init, which waits for
    the program, its own child. Returns in the program's process only; the other two end as it ends. The init
    ending (with the program, or killed along with this process's group at the time limit) kills the rest."""
    init = os.fork()
    if init:
        end_as(wait_for(init))
    call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # should the waiting process die first
    program = os.fork()
    if program:
        code = wait_for(program)
        os._exit(128 - code if code < 0 else min(code, 128))  # 128: the program's own exit(128) or more, a failure
    os.setpgid(0, 0)  # the program's group is its own: the audit hook lets it signal only that


def kill_by_uid_after(uid):
    """Without a PID namespace, as root: fork; this process, a subreaper (orphans of the program come to it),
    waits for the program (its child), then becomes the program's own ``uid``, sends SIGKILL to every process
    it may signal (kill(-1): all of that uid but itself), setsid() children included, and reaps them before it
    ends as the program did. Returns in the program's process. (Never as nobody, which other processes may
    share: where ``uid`` is not mapped the program runs as nobody, this setresuid fails, and nothing is killed.)"""
    call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    program = os.fork()
    if not program:
        return
    code = wait_for(program)
    try:
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    end_as(code)


# --- the program's own confinement ---------------------------------------------------------------------------------


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(scratch):
    """Restrict, with landlock, writing to the scratch directory (and /dev/null); the names of what applied."""
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_long(0), ctypes.c_long(1))
    if abi < 1:
        return []
    devices = FS_MAKE_CHAR | FS_MAKE_BLOCK
    writes = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SOCK
    writes |= FS_MAKE_FIFO | FS_MAKE_SYM | devices
    writes |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    network = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0  # no rule for any port: none
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    handled = (ctypes.c_uint64 * 3)(writes, network, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the ruleset struct as this ABI knows it
    ruleset = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), handled, ctypes.c_long(size), ctypes.c_long(0))
    if ruleset < 0:
        return []
    try:
        for path, allowed in ((scratch, writes & ~devices), ("/dev/null", FS_WRITE_FILE | (writes & FS_TRUNCATE))):
            if path == "/dev/null" and not os.path.exists(path):  # a bare container: nothing to allow
                continue
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(allowed, fd)
                call("syscall", SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0)  # 1: a path beneath
            finally:
                os.close(fd)
        call("syscall", SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    except OSError:
        return []
    finally:
        os.close(ruleset)
    return ["landlock-files"] + ["landlock-network"] * bool(network) + ["landlock-scope"] * bool(scoped)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_root(scratch, uid):
    """Become ``uid`` (or nobody, where the kernel has no such uid), keeping CAP_DAC_READ_SEARCH only, and give
    it the scratch directory and the output pipe (so that it may reopen /dev/stdout). Whether it worked."""
    call("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0)
    for user in (uid, NOBODY):
        try:
            os.chown(scratch, user, user)
            for fd in (1, 2):
                os.fchown(fd, user, user)
            os.setgroups([])
            os.setresgid(user, user, user)
            os.setresuid(user, user, user)
            break
        except OSError:
            continue
    if os.getuid() == 0:
        return False
    caps = (CapData * 2)(CapData(1 << CAP_DAC_READ_SEARCH, 1 << CAP_DAC_READ_SEARCH, 0))
    call("capset", ctypes.byref(CapHeader(0x20080522, 0)), caps)  # version 3: two 32-bit words
    call("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0)
    return True


def limit(kind, soft, hard):
    old_hard = resource.getrlimit(kind)[1]
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(kind, (soft, hard))


def confine(scratch, memory, cpu, namespaces, uid):
    """Everything that limits the program's process from here on; the names of what applied."""
    call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid program gives root back (landlock needs it too)
    got = list(namespaces) + landlock(scratch)
    if os.geteuid() == 0 and "user-namespace" not in got and drop_root(scratch, uid):
        got.append("unprivileged-user")
        if "pid-namespace" not in got and os.getuid() == uid:
            got.append("kill-by-uid")  # kill_by_uid_after's
    limit(resource.RLIMIT_AS, memory, memory)
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    limit(resource.RLIMIT_FSIZE, FILE_LIMIT, FILE_LIMIT)
    if "unprivileged-user" in got or "user-namespace" in got:  # counted per uid, or per user namespace
        limit(resource.RLIMIT_NPROC, PROCESS_LIMIT, PROCESS_LIMIT)
        got.append("process-limit")
    return got


# --- the audit hook (defence in depth) ------------------------------------------------------------------------------


def make_hook(scratch, allow_fork):
    # everything the hook uses is bound here, out of the program's reach: it may monkeypatch
    # modules and builtins, and pass str subclasses whose methods lie (hence str_.__str__ etc.)
    write, exit_, fspath, getcwd, readlink, getpid, getpgid = (
        os.write,
        os._exit,
        os.fspath,
        posix.getcwd,
        posix.readlink,
        posix.getpid,
        posix.getpgid,
    )
    flush = [sys.stdout.flush, sys.stderr.flush]
    str_, bytes_, int_, isinstance_, len_, list_, reversed_, any_, type_ = (
        str,
        bytes,
        int,
        isinstance,
        len,
        list,
        reversed,
        any,
        type,
    )
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    harmless = {"/dev/null", "/dev/stdout", "/dev/stderr", ":memory:"}
    network = {
        "socket.connect",
        "socket.bind",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
        "socket.sendto",
        "socket.sendmsg",
    }
    processes = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.startfile"}
    forks = {"os.fork", "os.forkpty"}
    internals = {"gc.get_objects", "gc.get_referrers", "gc.get_referents"}
    no_import = {"ctypes", "_ctypes", "_posixsubprocess"}
    # event -> (index of a path argument, index of its dir_fd argument or None), ...
    paths = {
        "os.remove": ((0, 1),),
        "os.rmdir": ((0, 1),),
        "os.mkdir": ((0, 2),),
        "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),),
        "os.rename": ((0, 2), (1, 3)),
        "os.link": ((0, 2), (1, 3)),
        "os.symlink": ((1, 2),),
        "os.truncate": ((0, None),),
        "os.utime": ((0, 3),),
        "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),),
        "os.chflags": ((0, None),),
        "shutil.rmtree": ((0, 1),),
        "sqlite3.connect": ((0, None),),
    }

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


# --- running the program --------------------------------------------------------------------------------------------


def run(source, program):
    """Run the program as ``__main__``; its exit code (0: it ran to its last line)."""
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        exec(compile(source, program, "exec"), main.__dict__)
        return 0
    except MemoryError:
        sys.stderr.write("MemoryError: the program went over its memory limit\n")
        return MEMORY_EXIT
    except SystemExit as e:
        sys.stderr.write(
            f"the program called exit({e.code!r}) before its last line: only a program that runs to its end passes\n"
        )
        return 1
    except BaseException:
        kind, error, trace = sys.exc_info()
        try:
            traceback.print_exception(kind, error, trace.tb_next)  # from the program's own first frame
        except BaseException:
            sys.stderr.write("the program raised an exception (its traceback could not be printed)\n")
        return 1


def main():
    scratch, program, memory, cpu, allow_fork, nonce_fd, report_fd = sys.argv[1:8]
    memory, cpu, nonce_fd, report_fd = int(memory), int(cpu), int(nonce_fd), int(report_fd)
    sys.argv = [program]
    own_uid = OWN_UID_BASE + os.getpid()
    limit(resource.RLIMIT_CORE, 0, 0)  # here, for the waiting processes too: they end by the program's signal
    namespaces = unshare_namespaces()
    if "pid-namespace" in namespaces:
        enter_pid_namespace()
    elif os.geteuid() == 0:
        kill_by_uid_after(own_uid)
    confined = confine(scratch, memory, cpu, namespaces, own_uid)
    read, write, exit_, getpid, me = os.read, os.write, os._exit, os.getpid, os.getpid()
    flushes = [sys.stdout.flush, sys.stderr.flush]
    write(report_fd, f"confined: {' '.join(confined)}\n".encode())
    with open(program, encoding="utf-8") as f:
        source = f.read()
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # so that the audit hook sees the program's own import of ctypes
    sys.addaudithook(make_hook(scratch, allow_fork == "1"))
    try:
        status = run(source, program)
    except BaseException:  # raised while reporting the program's own end (by a stderr it replaced, say)
        status = 1
    for flush in flushes:
        try:
            flush()
        except BaseException:
            pass
    if status == 0 and getpid() == me:  # the end of the program's last line (a forked child's is not)
        try:
            write(report_fd, read(nonce_fd, 64))
        except BaseException:
            status = 1
    exit_(status)


if __name__ == "__main__":  # run as a script only: importing this module must not start a sandbox
    main()
