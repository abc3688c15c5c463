"""The sandbox ends loops, memory hogs, writes outside its directory, network use and process
starts with the right status, and passes correct programs."""

import functools
import os
import socket
import time

import pytest

from loraflow.evaluate import sandbox
from loraflow.evaluate.sandbox import Outcome, run_program, run_programs


def dead(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (a container's init may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_correct_code_passes_and_a_failing_assert_fails():
    ok = run_program("def f(x):\n    return 2 * x\n\nassert f(3) == 6\nprint('done')")
    assert ok == Outcome("passed", "done", ok.seconds) and ok.passed
    bad = run_program("def f(x):\n    return 2 * x\n\nassert f(3) == 7")
    assert bad.status == "failed" and not bad.passed
    assert "AssertionError" in bad.detail and 'File "program.py", line 4' in bad.detail
    assert "<string>" not in bad.detail  # the bootstrap's own frame is left out
    assert run_program("def f(:").status == "failed"


def test_an_early_exit_cannot_skip_the_tests():
    for exit_call in ("import sys; sys.exit(0)", "exit()", "import os; os._exit(0)", "import posix; posix._exit(0)"):
        out = run_program(f"{exit_call}\nassert False, 'the tests'")
        assert out.status == "failed", (exit_call, out)
        assert "before its last line" in out.detail


def test_a_crash_is_reported_as_its_signal_and_exit_codes_as_given():
    out = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert out.status == "failed" and "crashed with signal Segmentation fault" in out.detail, out
    out = run_program("import os\nos._exit(3)")
    assert out.status == "failed" and "exited with status 3" in out.detail, out


def test_an_infinite_loop_is_killed_at_the_wall_clock_limit():
    start = time.monotonic()
    out = run_program("while True:\n    pass", timeout_s=1.0)
    assert out.status == "timeout" and "1 s limit" in out.detail
    assert 1.0 <= out.seconds < 2.0 and time.monotonic() - start < 2.5


def test_a_forked_sleeping_child_dies_with_the_program():
    source = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    print('child', os.readlink('/proc/self'), flush=True)\n"  # its pid outside its PID namespace
        "    time.sleep(60)\n"
        "while True:\n"
        "    pass\n"
    )
    start = time.monotonic()
    out = run_program(source, timeout_s=1.0, allow_fork=True)
    assert out.status == "timeout" and time.monotonic() - start < 2.5  # the child's open pipe did not hold it up
    child = int(out.detail.split("child")[1].split()[0])
    deadline = time.monotonic() + 2
    while not dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead(child)
    # a child left sleeping after a clean run is killed as well, without waiting for it
    out = run_program("import os, time\nif os.fork() == 0:\n    time.sleep(30)\n", timeout_s=10, allow_fork=True)
    assert out.status == "passed" and out.seconds < 3


@pytest.mark.parametrize(
    "source",
    ["x = bytearray(4 * 2**30)", "x = []\nwhile True:\n    x.append(bytearray(2**20))"],
    ids=["4-GiB-at-once", "growing-list"],
)
def test_a_memory_hog_ends_as_memory(source):
    out = run_program(source, timeout_s=10, memory_mb=256)
    assert out.status == "memory", out
    assert out.seconds < 5
    assert run_program("x = bytearray(64 * 2**20)\nassert len(x) == 64 * 2**20", memory_mb=256).passed


def test_writing_outside_the_scratch_directory_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    out = run_program(f"open({str(target)!r}, 'w').write('x')")
    assert out.status == "blocked" and str(target) in out.detail
    assert not target.exists()
    # through os.open, a relative path after chdir, and a symlink made inside the scratch directory
    sneaky = [
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'a')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
    ]
    for source in sneaky:
        assert run_program(source).status == "blocked", source
        assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    for source in (f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'moved.txt')"):
        assert run_program(source).status == "blocked", source
    assert run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})").status == "blocked"
    assert keep.read_text() == "mine"


def test_the_hook_survives_monkeypatching(tmp_path):
    target = tmp_path / "escaped.txt"
    source = (
        "import builtins, os, posixpath\n"
        "builtins.isinstance = lambda *a: False\n"
        "posixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd()\n"
        "import __main__\n"
        f"open({str(target)!r}, 'w')\n"
    )
    assert run_program(source).status == "blocked"
    liar = (  # a path whose string methods claim it is relative and inside
        "class Liar(str):\n"
        "    def startswith(self, *a):\n"
        "        return False\n"
        "    __hash__ = str.__hash__\n"
        f"open(Liar({str(target)!r}), 'w')\n"
    )
    assert run_program(liar).status == "blocked"
    assert not target.exists()


def test_writing_inside_the_scratch_directory_works_and_it_is_removed():
    source = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('hello')\n"
        "os.mkdir('d')\n"
        "os.rename('a.txt', 'd/b.txt')\n"
        "assert open('d/b.txt').read() == 'hello'\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('x')\n"
        "print(os.getcwd())\n"
    )
    out = run_program(source)
    assert out.passed, out
    scratch = out.detail.strip()
    assert "loraflow-sandbox-" in scratch and not os.path.exists(scratch)


def test_the_environment_is_clean(monkeypatch):
    monkeypatch.setenv("LORAFLOW_TEST_SECRET", "s3cret")
    source = "import os\nassert 'LORAFLOW_TEST_SECRET' not in os.environ\nassert os.environ['HOME'] == os.getcwd()"
    assert run_program(source).passed
    assert run_program("import sys\nassert sys.stdin.read() == ''").passed


def test_a_connection_to_a_local_listener_is_blocked():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        source = (
            f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'hi')"
        )
        out = run_program(source)
        assert out.status == "blocked" and "socket.connect" in out.detail
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert run_program("import socket\nsocket.getaddrinfo('example.com', 80)").status == "blocked"


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.kill(os.getppid(), 0)",
        "import ctypes",
        "import gc\ngc.get_objects()",
    ],
    ids=["fork", "subprocess", "system", "exec", "kill-parent", "ctypes", "gc"],
)
def test_processes_signals_and_internals_are_blocked(source):
    out = run_program(source)
    assert out.status == "blocked", out
    assert "blocked" in out.detail


def test_run_programs_keeps_order_and_runs_at_once():
    sources = ["import time\ntime.sleep(1)"] * 3 + ["assert False", "while True: pass"]
    start = time.monotonic()
    outs = run_programs(sources, timeout_s=1.5, workers=5)
    assert [o.status for o in outs] == ["passed"] * 3 + ["failed", "timeout"]
    assert time.monotonic() - start < 3.5  # five programs of 1-1.5 s each, side by side
    assert run_programs([]) == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=8)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)
    with pytest.raises(ValueError, match="source"):
        run_program(b"pass")


# --- issue 23: what a hostile program tried, each of which the kernel must now refuse ---------------------------


@functools.cache
def confinement() -> tuple[str, ...]:
    """What the sandbox gets from this kernel (``Outcome.confinement``): tests of one mechanism skip,
    saying which, only where the kernel genuinely lacks it."""
    return run_program("pass").confinement


def needs(mechanism: str) -> None:
    if mechanism not in confinement():
        pytest.skip(f"this kernel gives the sandbox no {mechanism} (it has: {', '.join(confinement()) or 'nothing'})")


@pytest.fixture
def open_folder(tmp_path):
    """A folder outside the scratch directory that anyone may write to (as /tmp is), so that
    only the sandbox, not file permissions, keeps the program out."""
    tmp_path.chmod(0o777)
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    keep.chmod(0o666)
    return tmp_path


@pytest.mark.parametrize(
    "write",
    [
        "os.open('created.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        "os.write(os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd), b'overwritten')",
        "open('created.txt', 'w', opener=lambda path, flags: os.open(path, flags, dir_fd=fd)).write('x')",
        "open('keep.txt', 'w', opener=lambda path, flags: os.open(path, flags, dir_fd=fd)).write('overwritten')",
        "os.mkfifo('created.txt', dir_fd=fd)",
        "os.mkfifo(folder + '/created.txt')",
        "os.mknod(folder + '/created.txt', stat.S_IFCHR | 0o666, os.makedev(1, 3))",
        "os.mknod(folder + '/created.txt')",
        "os.link(folder + '/keep.txt', 'mine.txt')\nopen('mine.txt', 'w').write('overwritten')",
    ],
    ids=[
        "dir_fd-create",
        "dir_fd-overwrite",
        "opener-create",
        "opener-overwrite",
        "mkfifo-dir_fd",
        "mkfifo",
        "mknod-device",
        "mknod-file",
        "hardlink-in",
    ],
)
def test_the_kernel_refuses_writes_outside_the_scratch_directory(open_folder, write):
    needs("landlock-files")
    source = f"import os, stat\nfolder = {str(open_folder)!r}\nfd = os.open(folder, os.O_RDONLY)\n{write}\n"
    out = run_program(source)
    assert out.status != "passed", out
    assert sorted(p.name for p in open_folder.iterdir()) == ["keep.txt"]
    assert (open_folder / "keep.txt").read_text() == "mine"


def test_fifos_and_files_inside_the_scratch_directory_still_work():
    source = (
        "import os, stat\n"
        "os.mkfifo('f')\n"
        "assert stat.S_ISFIFO(os.stat('f').st_mode)\n"
        "fd = os.open('.', os.O_RDONLY)\n"
        "os.write(os.open('g.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'x')\n"
        "assert open('g.txt').read() == 'x'\n"
    )
    assert run_program(source).passed


@pytest.mark.parametrize(
    "escape",
    [
        # the probe's: walk the frames up to the bootstrap and call whatever there ends a process
        "import sys\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    for name, value in list(f.f_locals.items()) + list(f.f_globals.items()):\n"
        "        if 'exit' in name.lower() and callable(value):\n"
        "            value(0)\n"
        "    f = f.f_back\n",
        # an exit raised while the bootstrap reports the program's own exit
        "class Code:\n    def __repr__(self):\n        raise SystemExit(0)\nraise SystemExit(Code())\n",
        "import sys\nclass Quiet:\n    def write(self, text):\n        raise SystemExit(0)\n"
        "sys.stderr = Quiet()\nexit(1)\n",
    ],
    ids=["frame-walk", "exit-in-repr", "exit-in-stderr"],
)
def test_an_early_exit_through_the_bootstrap_does_not_pass(escape):
    out = run_program(f"{escape}\nassert False, 'the tests'\n")
    assert out.status == "failed", out


def test_forks_are_bounded_even_as_root():
    needs("process-limit")
    source = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print('forked', n)\n"
    )
    out = run_program(source, allow_fork=True)
    assert out.passed, out
    assert int(out.detail.split()[-1]) < 100


SETSID_CHILD = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    print('child', os.readlink('/proc/self'), flush=True)\n"  # its pid as the host sees it
    "    time.sleep(30)\n"
    "    os._exit(0)\n"
    "time.sleep(0.5)\n"
)


def test_a_child_in_its_own_session_dies_when_run_program_returns():
    needs("pid-namespace")
    out = run_program(SETSID_CHILD, allow_fork=True)
    assert out.passed, out
    child = int(out.detail.split("child")[1].split()[0])
    assert dead(child), f"the setsid() child {child} outlived run_program"


def test_without_namespaces_root_kills_the_programs_uid(tmp_path, monkeypatch):
    """Where the kernel refuses namespaces (a container without CAP_SYS_ADMIN, say: simulated with a
    copy of the bootstrap whose unshare_namespaces gets none), a root process falls back to killing
    every process of the program's own uid once it ends."""
    if os.geteuid() != 0:
        pytest.skip("killing by uid is what a process running as root falls back to")
    text, marker = sandbox.BOOTSTRAP.read_text(), "def unshare_namespaces():\n"
    assert marker in text
    (tmp_path / "bootstrap.py").write_text(text.replace(marker, marker + "    return []\n", 1))
    monkeypatch.setattr(sandbox, "BOOTSTRAP", tmp_path / "bootstrap.py")
    out = run_program(SETSID_CHILD, allow_fork=True)
    assert out.passed, out
    assert "kill-by-uid" in out.confinement and "pid-namespace" not in out.confinement
    child = int(out.detail.split("child")[1].split()[0])
    assert dead(child), f"the setsid() child {child} outlived run_program"
