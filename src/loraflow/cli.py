"""``loraflow <command>``: thin scripts over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_prepare(args) -> None:
    """Convert the embedded default model into the cache (done once; later loads are fast)."""
    from loraflow.models.loading import default_model_path

    start = time.perf_counter()
    path = default_model_path()
    print(f"default model ready at {path} ({time.perf_counter() - start:.1f} s)")


def cmd_inspect(args) -> None:
    """Print an adapter folder's config and tensor shapes."""
    from safetensors import safe_open

    from loraflow.adapters.files import CONFIG_NAME, WEIGHTS_NAME, config_from_fields
    from pathlib import Path

    folder = Path(args.path)
    fields = json.loads((folder / CONFIG_NAME).read_text())
    print(config_from_fields(fields))
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
        for key in f.keys():
            print(f"  {key}  {tuple(f.get_slice(key).get_shape())}")


def cmd_serve(args) -> None:
    """Serve the OpenAI-compatible API with per-request adapters."""
    import uvicorn

    from loraflow.serve.api import create_app
    from loraflow.serve.engine import Engine
    from loraflow.serve.loop import EngineLoop

    adapters = {}
    for spec in args.lora or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            sys.exit(f"--lora takes NAME=PATH, got {spec!r}")
        adapters[name] = path
    if args.allow_runtime_lora and not args.adapter_dir:
        sys.exit("--allow-runtime-lora needs --adapter-dir (adapters load only from under it)")
    model, extra = args.model, {}
    if args.random_weights:                  # benchmarks: a model shape with random weights
        import torch

        from loraflow.serve.llama import SHAPES, LlamaArgs, numbered_tokenizer, random_llama

        device = "cuda" if torch.cuda.is_available() else "cpu"
        shape = LlamaArgs(**SHAPES[args.random_weights])
        model = random_llama(shape, torch.bfloat16 if device == "cuda" else torch.float32, device)
        extra = dict(tokenizer=numbered_tokenizer(shape.vocab_size), model_name=args.random_weights, device=device)
    engine = Engine(model=model, adapters=adapters, adapter_dir=args.adapter_dir,
                    max_batch_tokens=args.max_batch_tokens, max_gpu_adapters=args.max_gpu_adapters,
                    max_cpu_adapters=args.max_cpu_adapters, max_lora_rank=args.max_lora_rank,
                    max_waiting=args.max_waiting, **extra)
    import sys
    import threading

    # The engine thread lets go of the GIL while the GPU runs a step; when the step ends it
    # must get it back from the HTTP thread, which keeps it for up to the switch interval
    # (5 ms by default, a third of a decode step). Ask for it back sooner (measured on the
    # H200 only: benchmarks/NOTES-serve.md).
    if engine.device.type == "cuda":
        sys.setswitchinterval(0.0005)
    loop = EngineLoop(engine, background=False)      # the engine stays on this (main) thread
    app = create_app(loop, api_key=args.api_key, adapter_dir=args.adapter_dir,
                     allow_runtime_lora=args.allow_runtime_lora)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    print(f"serving {engine.model_name} with {len(engine.registry.paths)} adapters on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):         # graceful stop on Ctrl-C and on kill
        signal.signal(sig, lambda *_: loop.stop())
    stopper = threading.Thread(target=lambda: (http.join(), loop.stop()), daemon=True)
    stopper.start()                                     # the HTTP server ended: stop the engine
    try:
        loop.run_forever()
    finally:
        server.should_exit = True
        loop.close()
        http.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    from loraflow.bench.commands import cmd_bench_kernels, cmd_bench_serve, cmd_bench_train

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain"]:                      # a recipe with its own arguments
        from loraflow.train.pretrain import main as pretrain

        print(json.dumps(pretrain(argv[1:])))
        return
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("prepare", help=cmd_prepare.__doc__).set_defaults(func=cmd_prepare)
    sub.add_parser("pretrain", help="train a LLaMA from scratch (loraflow pretrain --help)")
    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("path", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--model", help="a local Hugging Face Llama-family folder (default: the embedded SmolLM2)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="an adapter to serve (repeatable)")
    p.add_argument("--adapter-dir", help="serve every adapter folder under this folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-gpu-adapters", type=int, default=8, help="adapters resident on the device")
    p.add_argument("--max-cpu-adapters", type=int, default=64, help="adapters kept in host memory")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--random-weights", choices=["llama2-7b"],
                   help="serve a model of this shape with random weights (for benchmarks)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="allow POST /v1/load_lora_adapter (paths under --adapter-dir only)")
    p.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks (GPU)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("serve", help=cmd_bench_serve.__doc__)
    p.add_argument("--shape", default="default", choices=["default", "llama2-7b"],
                   help="the embedded SmolLM2, or a Llama-2-7B-shaped model with random weights")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at once")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--mix", default="distinct", choices=["identical", "uniform", "skewed", "distinct"])
    p.add_argument("--adapters", type=int, default=64, help="distinct adapters the requests use")
    p.add_argument("--registered", type=int, default=1000, help="adapter names registered on the server")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-gpu-adapters", type=int, help="device slots (default: --adapters)")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each kind, in turn; the report takes each kind's median run")
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT baseline")
    p.add_argument("--peft-batch", type=int, default=64, help="rows per PEFT generate call")
    p.add_argument("--peft-requests", type=int, help="requests for the PEFT baseline (default: --requests)")
    p.add_argument("--peft-output-len", type=int, help="output tokens in the PEFT baseline (default: --output-len)")
    p.add_argument("--out", default="benchmarks/results")
    p.set_defaults(func=cmd_bench_serve)
    p = bench.add_parser("train", help=cmd_bench_train.__doc__)
    p.add_argument("--configs", default="60m,130m,350m,1b,7b")
    p.add_argument("--variants", default="adamw,adamw8bit,galore,galore8bit,galore-torch,galore-torch8bit")
    p.add_argument("--batch", type=int, default=1, help="sequences of 256 tokens per step")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--accumulation", type=int, default=1,
                   help="micro-batches per optimizer step (the paper's 1B runs: 512 x 256 tokens a step)")
    p.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="Adam moments of our 32-bit variants (galore-torch keeps them in the weights' bf16)")
    p.add_argument("--svd", default="gram", choices=["full", "gram", "randomized"],
                   help="how our GaLore finds its bases (galore-torch always runs a full SVD): gram (default), "
                        "the smaller Gram matrix's eigenvectors, the SVD's subspace; full SVD; randomized, torch.svd_lowrank")
    p.add_argument("--randomized-svd", dest="svd", action="store_const", const="randomized",
                   help="the same as --svd randomized")
    p.add_argument("--cpu", action="store_true", help="allow a smoke run without a GPU")
    p.add_argument("--out", default="benchmarks/results")
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
