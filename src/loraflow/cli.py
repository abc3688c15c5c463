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


def cmd_bench_kernels(args) -> None:
    """Time the per-row adapter ops (GPU); write JSON, Markdown and PNG under --out."""
    import torch
    from tqdm import tqdm

    from loraflow.bench import kernels, kernels_report, report
    from loraflow.bench.timing import copy_bandwidth_gbs, warm_up_gpu

    if args.merge:
        return merge_kernel_parts(args.merge, args.out)
    if not torch.cuda.is_available():
        sys.exit("loraflow bench kernels needs a CUDA GPU (its figures are GPU figures)")
    cases = kernels.grid(quick=args.quick, kind=args.kind)
    warm_up_gpu()
    bandwidth = copy_bandwidth_gbs()
    if args.sweep:
        import itertools
        decode = kernels.Case("decode", 4096, 4096, 64, 1, 16, "distinct")
        prefill = kernels.Case("prefill", 4096, 4096, 16, 256, 16, "distinct")
        rows_cfgs = [dict(variant=v, block_k=bk, split_k=sk, block_n=bn, warps=w) for v, bk, sk, bn, w in
                     itertools.product(["rows", "fused"], [256, 512], [8, 16, 32], [512, 1024], [4, 8])]
        tile_cfgs = [dict(block_m=bm, block_k=bk, split_k=sk, block_n=bn, warps=w) for bm, bk, sk, bn, w in
                     itertools.product([32, 64], [64, 128], [2, 4, 8], [128, 256], [4, 8])]
        for case, cfgs in [(decode, rows_cfgs), (prefill, tile_cfgs)]:
            res = sorted(kernels.sweep(case, cfgs), key=lambda r: r["addon_us"])
            print(f"{case.kind}: copy bandwidth {bandwidth:.0f} GB/s; best of {len(res)}:")
            for r in res[:8] + res[-2:]:
                print("  ", r)
            for v in ["rows", "fused"]:
                best = [r for r in res if r["variant"] == v][:1]
                if best:
                    print("   best", v, best[0])
        return
    errors = {f"{c.kind} {c.rows}x{c.T} r{c.rank} {c.mix}": kernels.check_case(c)
              for c in cases if c.d_in == 4096 and c.d_out == 4096}
    bad = {k: e for k, e in errors.items() if not e < 1e-2}
    if bad:
        sys.exit(f"kernels disagree with the float64 loop: {bad}")
    if args.part:
        i, k = (int(v) for v in args.part.split("/"))
        cases = cases[i - 1::k]
    rows = []
    for case in tqdm(cases, desc="cases"):
        rows.append(kernels.run_case(case, bandwidth, peft=not args.no_peft))
    env = report.environment()
    if args.part:   # a share of the grid: JSON only, ``--merge`` makes the report
        import json
        from pathlib import Path
        path = Path(args.out) / f"kernels.part{i}of{k}{'.' + args.kind if args.kind else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, "copy_bandwidth_gbs": bandwidth,
                                    "max_rel_error_bf16": max(errors.values()), "cases": rows}, indent=1))
        print("wrote", path)
        return
    payload = {"environment": env, "copy_bandwidth_gbs": bandwidth, "max_rel_error_bf16": max(errors.values()),
               "targets": kernels_report.targets(rows), "cases": rows}
    paths = report.write(args.out, "kernels" + ("-quick" if args.quick else ""), payload,
                         kernels_report.markdown(env, bandwidth, rows), kernels_report.figure(rows))
    print(kernels_report.markdown(env, bandwidth, rows).split("## decode")[0])
    print("wrote", *paths)


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

        from loraflow.serve.llama import SHAPES, LlamaArgs, random_llama

        device = "cuda" if torch.cuda.is_available() else "cpu"
        shape = LlamaArgs(**SHAPES[args.random_weights])
        model = random_llama(shape, torch.bfloat16 if device == "cuda" else torch.float32, device)
        extra = dict(tokenizer=_numbered_tokenizer(shape.vocab_size), model_name=args.random_weights, device=device)
    engine = Engine(model=model, adapters=adapters, adapter_dir=args.adapter_dir,
                    max_batch_tokens=args.max_batch_tokens, max_gpu_adapters=args.max_gpu_adapters,
                    max_cpu_adapters=args.max_cpu_adapters, max_lora_rank=args.max_lora_rank,
                    max_waiting=args.max_waiting, **extra)
    import threading

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


def cmd_bench_serve(args) -> None:
    """Load-test the server on loopback with many adapters; JSON, Markdown and PNG under --out."""
    import tempfile
    from pathlib import Path

    import torch

    from loraflow.bench import report, serve_report
    from loraflow.bench import serve as bench
    from loraflow.models.loading import default_model_path
    from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = bench.Workload(requests=args.requests, rate=args.rate, prompt_len=args.prompt_len,
                       output_len=args.output_len, mix=args.mix, adapters=args.adapters,
                       registered=args.registered, rank=args.rank)
    if args.shape == "default":
        shape = LlamaArgs.from_hf(json.loads((default_model_path() / "config.json").read_text()))
        base_name, model_args = "SmolLM2-135M-Instruct", []
    else:
        shape = LlamaArgs(**SHAPES[args.shape])
        base_name, model_args = args.shape, ["--random-weights", args.shape]
    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    folders = bench.make_adapters(linear_shapes(shape), tmp / "pool", w.adapters, w.rank)
    names = bench.name_folders(tmp / "names", folders, w.registered)
    serve_args = [*model_args, "--adapter-dir", str(names), "--max-gpu-adapters", str(args.max_gpu_adapters or w.adapters),
                  "--max-cpu-adapters", str(max(64, w.adapters)), "--max-lora-rank", str(w.rank),
                  "--max-batch-tokens", str(args.max_batch_tokens), "--max-waiting", str(4 * w.requests + 64)]
    result = bench.run(serve_args, w, base_name, shape.vocab_size, tmp / "server.log")
    print(json.dumps({k: result[k] for k in ("adapters", "base", "adapters_over_base")}, indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)     # kept if the baseline below fails
    (Path(args.out) / f"serve-{args.shape}-{device}.partial.json").write_text(
        json.dumps({"environment": report.environment(), **result}, indent=1))
    if not args.no_peft:
        peft_w = bench.Workload(**{**bench.asdict(w), "requests": args.peft_requests or w.requests,
                                   "output_len": args.peft_output_len or w.output_len})
        result["peft"] = bench.peft_baseline(_hf_model(args.shape, shape, device), folders, peft_w,
                                             args.peft_batch, device)
        result["ours_over_peft"] = result["adapters"]["output_tokens_per_s"] / result["peft"]["output_tokens_per_s"]
    env = report.environment()
    payload = {"environment": env, **result}
    stem = f"serve-{args.shape}-{device}"
    paths = report.write(args.out, stem, payload, serve_report.markdown(env, payload), serve_report.figure(payload))
    (Path(args.out) / f"{stem}.partial.json").unlink(missing_ok=True)
    print(serve_report.markdown(env, payload))
    print("wrote", *paths)


def _numbered_tokenizer(vocab: int):
    """A word-level tokenizer whose tokens are 't0' .. 't{vocab-1}' (for random-weight models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2", pad_token="t0")


def _hf_model(shape_name: str, shape, device: str):
    """The transformers model for the PEFT baseline: the default model, or the same shape
    with random weights (speed does not depend on the values)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.models.loading import default_model_path

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if shape_name == "default":
        return LlamaForCausalLM.from_pretrained(default_model_path(), dtype=dtype).to(device).eval()
    cfg = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.dim, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                      num_key_value_heads=shape.n_kv_heads, max_position_embeddings=shape.max_seq_len,
                      rms_norm_eps=shape.norm_eps, tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def cmd_bench_train(args) -> None:
    """Peak memory, optimizer-state bytes and tokens/s of the optimizers on LLaMA sizes (GPU)."""
    import torch
    from tqdm import tqdm

    from loraflow.bench import report, train_report
    from loraflow.bench.train import TrainCase, run_case

    if not torch.cuda.is_available() and not args.cpu:
        sys.exit("loraflow bench train measures GPU memory: run it on a CUDA machine (or --cpu for a smoke run)")
    ranks = {"tiny": 16, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
    cases = []
    for config in args.configs.split(","):
        for variant in args.variants.split(","):
            for per_layer in (False, True):
                cases.append(TrainCase(config, variant, per_layer, ranks[config], batch=args.batch, steps=args.steps,
                                       checkpointing=config == "7b"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [run_case(c, device, torch.bfloat16 if device == "cuda" else torch.float32)
            for c in tqdm(cases, desc="train cases")]
    env = report.environment()
    payload = {"environment": env, "targets": train_report.targets(rows), "cases": rows}
    paths = report.write(args.out, f"train-{device}", payload, train_report.markdown(env, rows), train_report.figure(rows))
    print(train_report.markdown(env, rows).split("## Runs")[0])
    print("wrote", *paths)


def merge_kernel_parts(folder: str, out: str) -> None:
    """One report from the ``--part`` JSON files in ``folder`` (runs anywhere, no GPU)."""
    import json
    from pathlib import Path

    from loraflow.bench import kernels_report, report

    parts = sorted(Path(folder).glob("kernels.part*.json"))
    if not parts:
        sys.exit(f"no kernels.part*.json files in {folder}")
    loaded = [json.loads(p.read_text()) for p in parts]
    env = dict(loaded[0]["environment"])
    env["command"] = "; ".join(sorted({d["environment"]["command"] for d in loaded}))
    bandwidth = max(d["copy_bandwidth_gbs"] for d in loaded)
    by_key = {}   # a later part (e.g. a re-run of one kind) replaces the same case
    for d in sorted(loaded, key=lambda d: d["environment"]["date"]):
        for r in d["cases"]:
            by_key[tuple(r[k] for k in ("kind", "d_in", "d_out", "rows", "T", "rank", "mix"))] = r
    rows = list(by_key.values())
    for r in rows:   # one roofline for the whole report: the best bandwidth any part measured
        if "addon_bytes" in r:
            r["roofline_ms"] = r["addon_bytes"] / (bandwidth * 1e9) * 1e3
            r["addon_over_roofline"] = r["triton_addon_ms"] / r["roofline_ms"]
    payload = {"environment": env, "copy_bandwidth_gbs": bandwidth,
               "max_rel_error_bf16": max(d["max_rel_error_bf16"] for d in loaded),
               "targets": kernels_report.targets(rows), "cases": rows}
    markdown = kernels_report.markdown(env, bandwidth, rows)
    paths = report.write(out, "kernels", payload, markdown, kernels_report.figure(rows))
    print(markdown.split("## decode")[0])
    print("wrote", *paths)


def main(argv: list[str] | None = None) -> None:
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
    p.add_argument("--cpu", action="store_true", help="allow a smoke run without a GPU")
    p.add_argument("--out", default="benchmarks/results")
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
