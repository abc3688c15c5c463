"""``loraflow <command>``: thin scripts over the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from loraflow.help_format import Parser

API_KEY_ENV = "LORAFLOW_API_KEY"


def cmd_prepare(args) -> None:
    """Convert the embedded default model into the cache (done once; later loads are fast)."""
    from loraflow.models.loading import default_model_path

    start = time.perf_counter()
    path = default_model_path()
    print(f"default model ready at {path} ({time.perf_counter() - start:.1f} s)")


def cmd_inspect(args) -> None:
    """Print an adapter folder's config and tensor shapes."""
    from safetensors import safe_open

    from loraflow.adapters.files import WEIGHTS_NAME, read_adapter

    folder = Path(args.path)
    try:  # checks it all: the folder, the config's JSON and fields, the weights file and tensors
        config, _ = read_adapter(folder)
    except (OSError, ValueError) as e:
        sys.exit(f"loraflow inspect: {e}")
    print(config)
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
        for key in f.keys():
            print(f"  {key}  {tuple(f.get_slice(key).get_shape())}")


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


def physical_cores() -> int:
    """The cores this process may run on, a core's hyper-threads counted once (Linux; elsewhere
    the CPU count)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text())
        except OSError:
            cores.add(cpu)
    return len(cores)


def default_threads() -> int:
    """PyTorch's CPU threads for serving: one fewer than the physical cores, at least one.

    PyTorch's OpenMP threads spin while they wait for each other, so when another process
    wants the same cores (a training run beside the server) one descheduled thread holds up
    its whole team. On 2 cores, beside a 2-thread matmul loop, a 20-token completion of
    SmolLM2-135M from ``loraflow serve`` took 31-64 s with 2 threads against 1.2-3.2 s with
    1 (1.0-1.2 s either way on idle cores: the spare core serves the HTTP thread).
    OMP_WAIT_POLICY=PASSIVE would stop the spinning, but OpenMP reads it when torch is
    imported, before ``main`` runs."""
    return max(1, physical_cores() - 1)


def configure_threads(threads: int | None, device: str) -> int:
    """Set PyTorch's intra-op threads before the engine is built: ``threads`` when given; else
    ``default_threads()`` on the CPU unless $OMP_NUM_THREADS chose, and PyTorch's own default
    on CUDA (the GPU does the work). Returns the number in use."""
    import torch

    if threads is not None:
        if threads < 1:
            sys.exit(f"loraflow serve: --threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    elif device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


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
            sys.exit(f"loraflow serve: --lora takes NAME=PATH, got {spec!r}")
        adapters[name] = path
    if args.allow_runtime_lora and not args.adapter_dir:
        sys.exit("loraflow serve: --allow-runtime-lora needs --adapter-dir (adapters load only from under it)")
    api_key = resolve_api_key(args)
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port fails at once
    import torch
    import uvicorn

    from loraflow.serve.api import create_app
    from loraflow.serve.engine import Engine
    from loraflow.serve.loop import EngineLoop

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = configure_threads(args.threads, device)
    model, extra = args.model, {}
    if args.random_weights:  # benchmarks: a model shape with random weights
        from loraflow.serve.llama import SHAPES, LlamaArgs, numbered_tokenizer, random_llama

        shape = LlamaArgs(**SHAPES[args.random_weights])
        model = random_llama(shape, torch.bfloat16 if device == "cuda" else torch.float32, device)
        extra = dict(tokenizer=numbered_tokenizer(shape.vocab_size), model_name=args.random_weights, device=device)
    engine = Engine(
        model=model,
        adapters=adapters,
        adapter_dir=args.adapter_dir,
        max_batch_tokens=args.max_batch_tokens,
        max_gpu_adapters=args.max_gpu_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_lora_rank=args.max_lora_rank,
        max_waiting=args.max_waiting,
        request_timeout=args.request_timeout or None,
        **extra,
    )

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
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    sock.listen(2048)  # connections queue from here on
    on = engine.device.type + (f", {threads} thread{'s' * (threads > 1)}" if engine.device.type == "cpu" else "")
    print(
        f"serving {engine.model_name} with {len(engine.registry.paths)} adapters on "
        f"http://{args.host}:{args.port}/v1 ({on})",
        flush=True,
    )
    serve_until_stopped(loop, server, sock)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as an ignored exception
    except BrokenPipeError:  # `loraflow inspect ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        sys.exit(141)  # what a shell reports for a process ended by SIGPIPE (128 + 13)


def _main(argv: list[str] | None) -> None:
    from loraflow.bench.commands import (
        cmd_bench_deep_matrix,
        cmd_bench_finetune,
        cmd_bench_kernels,
        cmd_bench_serve,
        cmd_bench_train,
    )

    argv = sys.argv[1:] if argv is None else argv
    recipes = {  # commands with their own arguments (module: main(argv) -> a JSON-able summary)
        "pretrain": "loraflow.train.pretrain",
        "finetune": "loraflow.finetune.command",
        "eval": "loraflow.evaluate.command",
    }
    if argv[:1] and argv[0] in recipes:
        import importlib

        command = argv[0]
        try:
            print(json.dumps(importlib.import_module(recipes[command]).main(argv[1:])))
        except (ValueError, FileNotFoundError) as e:  # the run's own checks: what to change, in one line
            sys.exit(f"loraflow {command}: {e}")
        except KeyboardInterrupt:  # checkpoints are written whole: the last one stands
            resumable = " the same command with --resume continues from the last complete checkpoint in --out"
            print(f"\nloraflow {command}: interrupted;" + (resumable if command != "eval" else ""), file=sys.stderr)
            sys.exit(130)
        return
    parser = Parser(prog="loraflow", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("prepare", help=cmd_prepare.__doc__).set_defaults(func=cmd_prepare)
    sub.add_parser("pretrain", help="train a LLaMA from scratch (loraflow pretrain --help)")
    sub.add_parser("finetune", help="train an adapter on your data (loraflow finetune --help)")
    sub.add_parser("eval", help="score an adapter: classification, perplexity, code pass@k (loraflow eval --help)")
    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("path", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--model", help="a local Hugging Face Llama-family folder (default: the embedded SmolLM2)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="an adapter to serve (repeatable)")
    p.add_argument("--adapter-dir", help="serve every adapter folder under this folder")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="the TCP port to listen on")
    p.add_argument("--max-gpu-adapters", type=int, default=8, help="adapters resident on the device")
    p.add_argument("--max-cpu-adapters", type=int, default=64, help="adapters kept in host memory")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the largest adapter rank served")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503")
    p.add_argument("--max-body-mb", type=positive_float, default=4.0, help="request bodies above this answer 413")
    p.add_argument(
        "--body-timeout", type=positive_float, default=30.0, help="seconds a request body may stall before 408"
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
        choices=["llama2-7b"],
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
        help="PyTorch's CPU threads (default: on the CPU one fewer than the cores, at least 1, "
        "or $OMP_NUM_THREADS; on CUDA PyTorch's own)",
    )
    p.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks (GPU)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("serve", help=cmd_bench_serve.__doc__)
    p.add_argument(
        "--shape",
        default="default",
        choices=["default", "llama2-7b"],
        help="the embedded SmolLM2, or a Llama-2-7B-shaped model with random weights",
    )
    p.add_argument("--requests", type=int, default=64, help="requests per timed run")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at once")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument(
        "--mix",
        default="distinct",
        choices=["identical", "uniform", "skewed", "distinct"],
        help="how requests pick their adapters",
    )
    p.add_argument("--adapters", type=int, default=64, help="distinct adapters the requests use")
    p.add_argument("--registered", type=int, default=1000, help="adapter names registered on the server")
    p.add_argument("--rank", type=int, default=16, help="the adapters' rank")
    p.add_argument("--max-gpu-adapters", type=int, help="device slots (default: --adapters)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="the server's tokens per engine step")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each kind, in turn; the report takes each kind's median run",
    )
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT baseline")
    p.add_argument("--peft-batch", type=int, default=64, help="rows per PEFT generate call")
    p.add_argument("--peft-requests", type=int, help="requests for the PEFT baseline (default: --requests)")
    p.add_argument("--peft-output-len", type=int, help="output tokens in the PEFT baseline (default: --output-len)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the reports")
    p.set_defaults(func=cmd_bench_serve)
    p = bench.add_parser("train", help=cmd_bench_train.__doc__)
    p.add_argument("--configs", default="60m,130m,350m,1b,7b", help="model sizes, comma-separated")
    p.add_argument(
        "--variants",
        default="adamw,adamw8bit,galore,galore8bit,galore-torch,galore-torch8bit",
        help="optimizers, comma-separated",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences of 256 tokens per step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per optimizer step (the paper's 1B runs: 512 x 256 tokens a step)",
    )
    p.add_argument(
        "--state-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="Adam moments of our 32-bit variants (galore-torch keeps them in the weights' bf16)",
    )
    p.add_argument(
        "--svd",
        default="gram",
        choices=["full", "gram", "randomized"],
        help="how our GaLore finds its bases (galore-torch always runs a full SVD): gram, "
        "the smaller Gram matrix's eigenvectors, the SVD's subspace; full SVD; randomized, torch.svd_lowrank",
    )
    p.add_argument(
        "--randomized-svd", dest="svd", action="store_const", const="randomized", help="the same as --svd randomized"
    )
    p.add_argument("--cpu", action="store_true", help="allow a smoke run without a GPU")
    p.add_argument("--out", default="benchmarks/results", help="folder for the reports")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="one report (train-NAME.*) from these runs' JSON files")
    p.add_argument("--name", default="cuda", help="with --merge: the report's name, train-NAME.*")
    p.set_defaults(func=cmd_bench_train)
    p = bench.add_parser("kernels", help=cmd_bench_kernels.__doc__)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    p.add_argument("--quick", action="store_true", help="three cases only (a smoke run)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed-batch forward")
    p.add_argument("--sweep", action="store_true", help="time launch configurations on the target cases")
    p.add_argument("--part", help="I/K: run the I-th of K shares of the grid (JSON only)")
    p.add_argument("--kind", choices=["decode", "prefill", "flora"], help="only cases of this kind")
    p.add_argument("--merge", metavar="DIR", help="make the report from the --part files in DIR")
    p.set_defaults(func=cmd_bench_kernels)
    p = bench.add_parser("finetune", help=cmd_bench_finetune.__doc__)
    p.add_argument("--shapes", default="default,1b", help="models: default (the embedded one) and Llama shapes")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state figures")
    p.add_argument("--batch-size", type=int, default=8, help="rows a step")
    p.add_argument("--max-length", type=int, default=512, help="tokens a row (packed text)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--tenants", type=int, default=16, help="adapters in the many-tenants run (0: skip it)")
    p.add_argument("--tenant-batch", type=int, default=2, help="rows each tenant adds to a step")
    p.add_argument("--tenant-steps", type=int, default=20, help="steps of the many-tenants runs")
    p.add_argument("--device", default="cuda", help="where to train")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    p.set_defaults(func=cmd_bench_finetune)
    from loraflow.bench.deep_matrix import add_arguments as deep_matrix_arguments

    p = bench.add_parser("deep-matrix-completion", help=cmd_bench_deep_matrix.__doc__)
    deep_matrix_arguments(p)
    p.set_defaults(func=cmd_bench_deep_matrix)
    args = parser.parse_args(argv)
    if args.version:
        from loraflow import __version__

        print(__version__)
        return
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    args.func(args)


if __name__ == "__main__":
    main()
