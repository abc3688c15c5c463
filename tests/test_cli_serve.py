"""``loraflow serve`` as a command: the port, the threads, the API key, and how it exits."""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from serve.helpers import tiny_llama_folder

from loraflow.serve.command import API_KEY_ENV, bind_socket, resolve_api_key
from loraflow.threads import configure_threads, default_threads


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "base"
    tiny_llama_folder(folder)
    return folder


def serve_cmd(model_folder, port, *extra):
    return [
        sys.executable,
        "-m",
        "loraflow.cli",
        "serve",
        "--model",
        str(model_folder),
        "--port",
        str(port),
        "--max-batch-tokens",
        "64",
        *extra,
    ]


def test_taken_port_fails_at_once_with_the_reason_and_the_fix(model_folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            serve_cmd(model_folder, port),
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != API_KEY_ENV},
        )
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in out.stderr
    assert "--port" in out.stderr
    assert "Traceback" not in out.stderr
    assert "serving" not in out.stdout


def test_serve_on_port_0_runs_until_sigterm_with_the_key_from_the_environment(model_folder):
    """The "serving" line comes once the port listens and tells the port (--port 0: a free
    one) and the threads; the key comes from $LORAFLOW_API_KEY; SIGTERM stops it with status 0."""
    env = dict(os.environ, **{API_KEY_ENV: "s3cret"})
    proc = subprocess.Popen(
        serve_cmd(model_folder, 0, "--threads", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving base with 0 adapters on http://127.0.0.1:"), line
        assert line.rstrip().endswith("(cpu, 1 thread)"), line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0, line
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # listening as soon as it says so
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "base"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stdout.read()


def test_serve_exits_non_zero_when_the_http_server_dies(model_folder):
    """The HTTP thread failing (here: its socket closed under it) stops the engine and exits non-zero."""
    import uvicorn

    from loraflow.serve.api import create_app
    from loraflow.serve.command import serve_until_stopped
    from loraflow.serve.engine import Engine
    from loraflow.serve.loop import EngineLoop

    loop = EngineLoop(Engine(model=model_folder, max_batch_tokens=64), background=False)
    server = uvicorn.Server(uvicorn.Config(create_app(loop), log_level="critical"))
    sock = bind_socket("127.0.0.1", 0)
    sock.close()
    sigterm = signal.getsignal(signal.SIGTERM)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        serve_until_stopped(loop, server, sock)
    assert "the HTTP server stopped" in str(exit_.value.code)  # a message: exit status 1
    assert time.perf_counter() - start < 30
    assert signal.getsignal(signal.SIGTERM) is sigterm  # handlers given back


def test_serve_until_stopped_returns_on_sigterm(model_folder):
    import uvicorn

    from loraflow.serve.api import create_app
    from loraflow.serve.command import serve_until_stopped
    from loraflow.serve.engine import Engine
    from loraflow.serve.loop import EngineLoop

    loop = EngineLoop(Engine(model=model_folder, max_batch_tokens=64), background=False)
    server = uvicorn.Server(uvicorn.Config(create_app(loop), log_level="critical"))
    sock = bind_socket("127.0.0.1", 0)
    sock.listen()
    port = sock.getsockname()[1]
    answers = []

    def client():
        try:
            answers.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=20).status_code)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    serve_until_stopped(loop, server, sock)  # returns: no SystemExit
    assert answers == [200]


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_option_sets_torch_threads(torch_threads):
    assert configure_threads(3, "cpu") == 3 == torch.get_num_threads()
    assert configure_threads(1, "cuda") == 1 == torch.get_num_threads()
    with pytest.raises(SystemExit, match="--threads must be at least 1"):
        configure_threads(0, "cpu")


def test_default_threads_leave_a_core_free_on_the_cpu(torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert 1 <= default_threads() <= max(1, cores - 1)
    if cores <= 2:
        assert default_threads() == 1
    torch.set_num_threads(cores)
    assert configure_threads(None, "cpu") == default_threads() == torch.get_num_threads()
    assert configure_threads(None, "cpu") == default_threads()  # the same on a second call
    torch.set_num_threads(cores)
    assert configure_threads(None, "cuda") == cores  # CUDA: PyTorch's own
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
    assert configure_threads(None, "cpu") == cores  # the user's choice stands


def key_args(api_key=None, api_key_file=None):
    return argparse.Namespace(api_key=api_key, api_key_file=api_key_file)


def test_api_key_precedence_flag_then_file_then_environment(tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text("  from-file \nsecond line\n")
    env = {API_KEY_ENV: "from-env"}
    assert resolve_api_key(key_args("from-flag", str(keyfile)), env) == "from-flag"
    assert resolve_api_key(key_args(None, str(keyfile)), env) == "from-file"
    assert resolve_api_key(key_args(), env) == "from-env"
    assert resolve_api_key(key_args(), {}) is None


def test_api_key_file_and_environment_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match=f"cannot read --api-key-file {missing} .*No such file"):
        resolve_api_key(key_args(None, str(missing)), {})
    empty = tmp_path / "empty"
    for text in ("", "\n", "   \nkey on the second line\n"):
        empty.write_text(text)
        with pytest.raises(SystemExit, match="has an empty first line"):
            resolve_api_key(key_args(None, str(empty)), {})
    with pytest.raises(SystemExit, match=f"{API_KEY_ENV} is set but empty"):
        resolve_api_key(key_args(), {API_KEY_ENV: " "})


def serve_refusal(capsys, *argv) -> str:
    """``loraflow serve ARGV`` in this process: it must exit with status 2 before it loads a model
    (--model names none) or binds a port."""
    from loraflow.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "/nonexistent-model", "--port", "0", *argv])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert "serving" not in out.out and "Traceback" not in out.err
    return out.err


@pytest.mark.parametrize("port", ["83641", "65536", "-1", "http"])
def test_ports_outside_1_to_65535_are_refused(capsys, port):
    err = serve_refusal(capsys, "--port", port)
    assert "argument --port" in err and "1..65535" in err and port in err


def test_missing_adapter_folders_are_refused_before_the_model_loads(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    err = serve_refusal(capsys, "--lora", f"x={missing}")
    assert err.strip() == (
        f"loraflow serve: --lora x={missing}: {missing} does not exist; pass an adapter folder "
        "(the --out of loraflow finetune, holding adapter_config.json)"
    )
    err = serve_refusal(capsys, "--lora", f"x={tmp_path}")
    assert "is not an adapter folder (no adapter_config.json)" in err and len(err.strip().splitlines()) == 1
    err = serve_refusal(capsys, "--adapter-dir", str(missing))
    assert err.strip() == (
        f"loraflow serve: --adapter-dir {missing} does not exist: pass the folder that holds your adapter folders"
    )
    (tmp_path / "file").write_text("")
    assert "is not a folder" in serve_refusal(capsys, "--adapter-dir", str(tmp_path / "file"))
