"""``loraflow <command>``: thin scripts over the library."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from loraflow.help_format import Parser
from loraflow.serve.command import add_arguments as serve_arguments
from loraflow.serve.command import cmd_serve


def cmd_prepare(args) -> None:
    """Convert the embedded default model into the cache (done once; later loads are fast)."""
    from loraflow.models.loading import default_model_path

    start = time.perf_counter()
    path = default_model_path()
    print(f"default model ready at {path} ({time.perf_counter() - start:.1f} s)")


def cmd_inspect(args) -> None:
    """Print an adapter folder's config and tensor shapes (a classifier's: and its trained head)."""
    from loraflow.adapters.describe import describe_adapter

    try:  # checks it all: the folder, the config's JSON and fields, the weights file and tensors
        text = describe_adapter(Path(args.path))
    except (OSError, ValueError) as e:
        sys.exit(f"loraflow inspect: {e}")
    print(text)  # outside the try: a closed pipe (BrokenPipeError, an OSError) is main's to handle


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
        first = os.environ.get("RANK", "0") == "0"  # under torchrun: the first process speaks for all
        try:
            summary = importlib.import_module(recipes[command]).main(argv[1:])
            if first:
                print(json.dumps(summary))
        except (ValueError, FileNotFoundError) as e:  # the run's own checks: what to change, in one line
            sys.exit(f"loraflow {command}: {e}" if first else 1)  # torchrun: every process refuses alike
        except KeyboardInterrupt:  # checkpoints are written whole: the last one stands
            if not first:
                sys.exit(130)
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
    serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks (GPU)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("serve", help=cmd_bench_serve.__doc__)
    p.add_argument(
        "--shape",
        default="default",
        choices=["default", "llama2-7b", "smollm2-135m", "tiny"],
        help="the embedded SmolLM2, or a model of this shape with random weights (tiny: next to no model, "
        "the server's own ceiling)",
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
    p.add_argument(
        "--kind",
        default="lora",
        choices=["lora", "flora", "mixed"],
        help="the adapters' kind: additive LoRA, multiplicative FLoRA, or every other adapter FLoRA",
    )
    p.add_argument("--max-gpu-adapters", type=int, help="device slots (default: --adapters)")
    p.add_argument("--max-cpu-adapters", type=int, help="adapters in host memory (default: --adapters, at least 64)")
    p.add_argument(
        "--adapter-files",
        type=int,
        help="adapter folders written to disk (default: --adapters); the distinct names link to them round robin "
        "and still load one by one: 10,000 names without 10,000 x 80 MB of files",
    )
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="the server's tokens per engine step")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each kind, in turn; the report takes each kind's median run",
    )
    p.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also run transformers' generate without adapters on the same model and prompts, all requests as "
        "one batch: compiled static cache (CUDA only) and eager dynamic cache, --repeats timed runs each",
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
        help="optimizers, comma-separated (also apollo, apollo8bit, apollo-mini)",
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
