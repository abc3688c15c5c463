"""``loraflow serve``: the OpenAI-compatible server on a port, until Ctrl-C or SIGTERM, and what
it needs around the engine: the API key, the listening socket, the CPU threads."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from loraflow.threads import THREADS_HELP, configure_threads, default_threads

__all__ = ["configure_threads", "default_threads"]  # shared with the other commands (loraflow/threads.py)

API_KEY_ENV = "LORAFLOW_API_KEY"


def resolve_api_key(args, environ=os.environ) -> str | None:
    """The key ``serve`` requires: --api-key, else the first line of --api-key-file, else
    $LORAFLOW_API_KEY; None (no key) when none of them is given."""
    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(
                f"loraflow serve: cannot read --api-key-file {args.api_key_file} "
                f"({getattr(e, 'strerror', None) or e}); pass a readable file with the key on its first line"
            )
        key = lines[0].strip() if lines else ""
        if not key:
            sys.exit(f"loraflow serve: --api-key-file {args.api_key_file} has an empty first line; write the key there")
        return key
    if API_KEY_ENV in environ:
        key = environ[API_KEY_ENV].strip()
        if not key:
            sys.exit(
                f"loraflow serve: ${API_KEY_ENV} is set but empty; set it to the key, or unset it to serve without one"
            )
        return key
    return None


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``; on failure, exit naming the address, the reason and the fix."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        sys.exit(
            f"loraflow serve: cannot listen on {host}:{port}: unknown host ({e.strerror}); "
            "pass an address of this machine with --host, e.g. 127.0.0.1 or 0.0.0.0"
        )
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        sock.bind(address)
    except OSError as e:
        sock.close()
        fix = {
            errno.EADDRINUSE: "another process listens there: stop it or choose a free port with --port",
            errno.EACCES: "ports below 1024 need privileges: choose another with --port",
            errno.EADDRNOTAVAIL: "the host is not an address of this machine: fix --host",
        }
        sys.exit(
            f"loraflow serve: cannot listen on {host}:{port} ({e.strerror}); "
            f"{fix.get(e.errno, 'choose another --port or --host')}"
        )
    return sock


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port: 1..65535, or 0 for any free one (the "serving" line names it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in 1..65535 (0: any free port), got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535 (0: any free port), got {value}")
    return value


def refuse(message: str) -> None:
    """A wrong command line: one line naming the fix, exit status 2 (as argparse's own errors)."""
    print(f"loraflow serve: {message}", file=sys.stderr)
    sys.exit(2)


def check_adapter_paths(adapters: dict[str, str], adapter_dir: str | None) -> None:
    """Refuse a missing --lora folder or --adapter-dir before the model loads."""
    from loraflow.adapters.files import CONFIG_NAME

    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        what = "is not a folder" if Path(adapter_dir).exists() else "does not exist"
        refuse(f"--adapter-dir {adapter_dir} {what}: pass the folder that holds your adapter folders")
    for name, path in adapters.items():
        folder = Path(path)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            refuse(
                f"--lora {name}={path}: {path} {what}; pass an adapter folder (the --out of loraflow finetune, "
                f"holding {CONFIG_NAME})"
            )
        if not (folder / CONFIG_NAME).is_file():
            refuse(f"--lora {name}={path}: {path} is not an adapter folder (no {CONFIG_NAME})")


def serve_until_stopped(loop, server, sock: socket.socket) -> None:
    """Run uvicorn's ``server`` on ``sock`` on a thread and the engine ``loop`` on this one
    until SIGINT or SIGTERM (a clean stop) or until the HTTP server ends by itself, which
    exits non-zero: a supervisor then sees the server is gone."""
    import signal
    import threading
    import traceback

    stopping = threading.Event()
    failure: list[str] = []

    def stop(*_):
        stopping.set()
        loop.stop()

    def run_http():
        try:
            server.run(sockets=[sock])
            failure.append("it returned")
        except SystemExit as e:  # uvicorn's start-up failures (logged by uvicorn)
            failure.append(f"exit status {e.code}")
        except BaseException as e:
            traceback.print_exc()
            failure.append(f"{type(e).__name__}: {e}")
        finally:
            loop.stop()  # the HTTP server ended: stop the engine

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=run_http, name="http", daemon=True)
    http.start()
    from loraflow.serve.loop import EngineDown

    try:
        loop.run_forever()
    except EngineDown as e:  # logged with each failure's traceback above
        sys.exit(f"loraflow serve: {e}; exiting non-zero for a supervisor to restart the server")
    finally:
        server.should_exit = True
        loop.close()
        http.join(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not stopping.is_set():
        sys.exit(
            f"loraflow serve: the HTTP server stopped ({failure[0] if failure else 'for an unknown reason'}); "
            "the engine stopped too. See the messages above"
        )


def cmd_serve(args) -> None:
    """Serve the OpenAI-compatible API with per-request adapters."""
    adapters = {}
    for spec in args.lora or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            refuse(f"--lora takes NAME=PATH, got {spec!r}")
        adapters[name] = path
    check_adapters(adapters)
    if args.allow_runtime_lora and not args.adapter_dir:
        refuse("--allow-runtime-lora needs --adapter-dir (adapters load only from under it)")
    check_adapter_paths(adapters, args.adapter_dir)
    api_key = resolve_api_key(args)
    if args.ray_address and not args.ray:
        refuse("--ray-address needs --ray (it names the Ray cluster that runs the replicas)")
    if args.ray:
        if args.tensor_parallel != 1:
            refuse("--ray runs one engine per replica: drop --tensor-parallel (each replica takes its own GPU)")
        from loraflow.deploy.command import cmd_serve_ray

        return cmd_serve_ray(args, adapters, api_key)
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port fails at once
    import torch

    from loraflow.serve.tp_launch import EngineSpec, build_engine, check_tensor_parallel, device_of, start, stop

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.tensor_parallel
    engine_kw = dict(
        adapters=adapters,
        adapter_dir=args.adapter_dir,
        # a GPU's prompt chunks: 2,048 tokens (what the benchmarks measure); the CPU's: 512
        max_batch_tokens=args.max_batch_tokens or (2048 if device == "cuda" else 512),
        max_gpu_adapters=args.max_gpu_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_lora_rank=args.max_lora_rank,
        max_waiting=args.max_waiting,
        request_timeout=args.request_timeout or None,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None,
    )
    spec = EngineSpec(args.model, args.random_weights, engine_kw)
    if n != 1:
        try:
            check_tensor_parallel(n, spec.model_args(), device, torch.cuda.device_count())
        except (OSError, ValueError) as e:
            sys.exit(f"loraflow serve: {e}")
        if device == "cpu" and args.threads is None and "OMP_NUM_THREADS" not in os.environ:
            args.threads = max(1, default_threads() // n)  # the ranks share the cores
    threads = configure_threads(args.threads, device)
    tp = workers = None
    if n != 1:
        tp, workers = start(n, device, threads, spec)
    clean = False
    try:
        engine = build_engine(spec, device_of(0, device) if tp else device, tp)
        serve_engine(engine, args, api_key, sock, threads)
        clean = True
    finally:
        if tp is not None:
            stop(tp, workers, clean)


def check_adapters(adapters: dict[str, str]) -> None:
    """Exit, naming the problem and the fix, for a --lora adapter that this server could never
    serve (a classifier), before the model loads."""
    from loraflow.serve.registry import AdapterError, check_servable

    for name, path in adapters.items():
        try:
            check_servable(name, path)
        except AdapterError as e:
            sys.exit(f"loraflow serve: --lora {name}={path}: {e}")


def serve_engine(engine, args, api_key: str | None, sock: socket.socket, threads: int) -> None:
    """The API over ``engine`` on ``sock`` until the server stops."""
    import uvicorn

    from loraflow.serve.api import create_app
    from loraflow.serve.http import server_config
    from loraflow.serve.loop import EngineLoop

    # The engine thread lets go of the GIL while the GPU runs a step; when the step ends it
    # must get it back from the HTTP thread, which keeps it for up to the switch interval
    # (5 ms by default, a third of a decode step). Ask for it back sooner (measured on the
    # H200 only: benchmarks/NOTES-serve.md).
    if engine.device.type == "cuda":
        sys.setswitchinterval(0.0005)
    loop = EngineLoop(engine, background=False)  # the engine stays on this (main) thread
    app = create_app(
        loop,
        api_key=api_key,
        adapter_dir=args.adapter_dir,
        allow_runtime_lora=args.allow_runtime_lora,
        max_body_bytes=int(args.max_body_mb * 2**20),
        body_timeout=args.body_timeout,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    import logging  # one line per request: id, adapter, tokens, times, status

    logging.basicConfig(
        level=logging.INFO if args.log_requests else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    server = uvicorn.Server(server_config(app, args.host, port, header_timeout=args.header_timeout))
    sock.listen(2048)  # connections queue from here on
    on = engine.device.type + (f", {threads} thread{'s' * (threads > 1)}" if engine.device.type == "cpu" else "")
    on += f", tensor parallel over {engine.tp.world} processes" if engine.tp else ""
    print(
        f"serving {engine.model_name} with {len(engine.registry.paths)} adapters on "
        f"http://{args.host}:{port}/v1 ({on})",
        flush=True,
    )
    serve_until_stopped(loop, server, sock)


def add_arguments(p) -> None:
    """The options of ``loraflow serve``."""
    p.add_argument("--model", help="a local Hugging Face Llama-family folder (default: the embedded SmolLM2)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="an adapter to serve (repeatable)")
    p.add_argument("--adapter-dir", help="serve every adapter folder under this folder")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument(
        "--port", type=port_number, default=8000, help="the TCP port to listen on: 1..65535, or 0 for any free one"
    )
    p.add_argument("--max-gpu-adapters", type=int, default=8, help="adapters resident on the device")
    p.add_argument("--max-cpu-adapters", type=int, default=64, help="adapters kept in host memory")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the largest adapter rank served")
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=None,
        help="tokens per engine step, prompt chunks and decode tokens together (default: 2048 on a GPU, 512 on a CPU)",
    )
    p.add_argument(
        "--kv-cache-gb",
        type=positive_float,
        help="memory for the KV cache, in GiB (default: half the free GPU memory; 0.5 on the CPU)",
    )
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503")
    p.add_argument("--max-body-mb", type=positive_float, default=4.0, help="request bodies above this answer 413")
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a request's whole body may take to arrive, from its headers, before 408",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a request's line and headers may take to arrive (from the connection or the previous "
        "response) before 408",
    )
    p.add_argument(
        "--max-prompt-tokens", type=int, help="prompts above this many tokens answer 400 (default: the context)"
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take from arrival before it fails with 504 (0: no limit)",
    )
    p.add_argument(
        "--no-log-requests",
        dest="log_requests",
        action="store_false",
        help="do not log a line per request (id, model, tokens, time to first token, total, status)",
    )
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every route but /health; "
        f"other users can read it with ps: prefer ${API_KEY_ENV} or --api-key-file",
    )
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help=f"read the key from this file's first line (after --api-key, before ${API_KEY_ENV})",
    )
    p.add_argument(
        "--random-weights",
        choices=["llama2-7b", "smollm2-135m", "tiny"],
        help="serve a model of this shape with random weights (for benchmarks)",
    )
    p.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="allow POST /v1/load_lora_adapter (paths under --adapter-dir only)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=THREADS_HELP + "; with --tensor-parallel N, each process's",
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="shard the model over N processes (Megatron-style: attention heads, MLP features and "
        "the vocabulary split N ways; each adapter split with its layer); one GPU each on CUDA, "
        "the cores shared on the CPU. N must divide the attention and key/value heads. The server "
        "starts the N-1 worker processes itself and they exit with it. Default 1: one process",
    )
    ray = p.add_argument_group("many replicas on Ray Serve (pip install 'loraflow[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve from --ray-replicas replicas of the engine on Ray Serve, each adapter's requests routed to "
        "the replicas that hold it; starts a Ray cluster on this machine unless --ray-address names one",
    )
    ray.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (ray://HOST:10001, HOST:6379, auto)")
    ray.add_argument("--ray-replicas", type=int, default=2, metavar="N", help="engine replicas")
    ray.add_argument(
        "--ray-replica-cpus", type=float, default=1.0, metavar="N", help="Ray CPUs per replica (and its threads)"
    )
    ray.add_argument(
        "--ray-replica-gpus",
        type=float,
        metavar="N",
        help="Ray GPUs per replica: 1 a GPU each, 0.5 two on a GPU (default: 1 where the cluster has GPUs, else 0)",
    )
    ray.add_argument(
        "--ray-adapters-per-replica",
        type=int,
        metavar="N",
        help="adapters each replica holds for routing, Serve's multiplexed LRU (default: --max-cpu-adapters)",
    )
    ray.add_argument(
        "--ray-max-ongoing-requests",
        type=int,
        default=256,
        metavar="N",
        help="requests a replica takes at once; past it Serve queues them or sends them to another replica",
    )
