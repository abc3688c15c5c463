"""The ``loraflow bench ...`` commands: thin scripts over loraflow.bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
        rows_cfgs = [
            dict(variant=v, block_k=bk, split_k=sk, block_n=bn, warps=w)
            for v, bk, sk, bn, w in itertools.product(["rows", "fused"], [256, 512], [8, 16, 32], [512, 1024], [4, 8])
        ]
        tile_cfgs = [
            dict(block_m=bm, block_k=bk, split_k=sk, block_n=bn, warps=w)
            for bm, bk, sk, bn, w in itertools.product([32, 64], [64, 128], [2, 4, 8], [128, 256], [4, 8])
        ]
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
    errors = {
        f"{c.kind} {c.rows}x{c.T} r{c.rank} {c.mix}": kernels.check_case(c)
        for c in cases
        if c.d_in == 4096 and c.d_out == 4096
    }
    bad = {k: e for k, e in errors.items() if not e < 1e-2}
    if bad:
        sys.exit(f"kernels disagree with the float64 loop: {bad}")
    if args.part:
        i, k = (int(v) for v in args.part.split("/"))
        cases = cases[i - 1 :: k]
    rows = []
    for case in tqdm(cases, desc="cases"):
        rows.append(kernels.run_case(case, bandwidth, peft=not args.no_peft))
    env = report.environment()
    if args.part:  # a share of the grid: JSON only, ``--merge`` makes the report
        path = Path(args.out) / f"kernels.part{i}of{k}{'.' + args.kind if args.kind else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "environment": env,
                    "copy_bandwidth_gbs": bandwidth,
                    "max_rel_error_bf16": max(errors.values()),
                    "cases": rows,
                },
                indent=1,
            )
        )
        print("wrote", path)
        return
    payload = {
        "environment": env,
        "copy_bandwidth_gbs": bandwidth,
        "max_rel_error_bf16": max(errors.values()),
        "targets": kernels_report.targets(rows),
        "cases": rows,
    }
    paths = report.write(
        args.out,
        "kernels" + ("-quick" if args.quick else "") + (f"-{args.kind}" if args.kind else ""),
        payload,
        kernels_report.markdown(env, bandwidth, rows),
        kernels_report.figure(rows),
    )
    print(kernels_report.markdown(env, bandwidth, rows).split("## decode")[0])
    print("wrote", *paths)


def cmd_bench_serve(args) -> None:
    """Load-test the server on loopback with many adapters; JSON, Markdown and PNG under --out."""
    import tempfile

    import torch

    from loraflow.bench import hf_generate, report, serve_report
    from loraflow.bench import serve as bench
    from loraflow.models.loading import default_model_path
    from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # a workload that cannot run: one line naming the option, no traceback
        w = bench.Workload(
            requests=args.requests,
            rate=args.rate,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            mix=args.mix,
            adapters=args.adapters,
            registered=args.registered,
            rank=args.rank,
            kind=args.kind,
            files=args.adapter_files or 0,
        )
    except ValueError as e:
        sys.exit(f"loraflow bench serve: {e}")
    if args.shape == "default":
        shape = LlamaArgs.from_hf(json.loads((default_model_path() / "config.json").read_text()))
        base_name, model_args = "SmolLM2-135M-Instruct", []
    else:
        shape = LlamaArgs(**SHAPES[args.shape])
        base_name, model_args = args.shape, ["--random-weights", args.shape]
    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    folders = bench.make_adapters(linear_shapes(shape), tmp / "pool", w.folders, w.rank, device=device, kind=w.kind)
    names = bench.name_folders(tmp / "names", folders, w.registered)
    serve_args = [
        *model_args,
        "--adapter-dir",
        str(names),
        "--max-gpu-adapters",
        str(args.max_gpu_adapters or w.adapters),
        "--max-cpu-adapters",
        str(args.max_cpu_adapters or max(64, w.adapters)),
        "--max-lora-rank",
        str(w.rank),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-waiting",
        str(4 * w.requests + 64),
    ]
    # a FLoRA run keeps its own files: serve-llama2-7b-flora-r2-cuda beside serve-llama2-7b-cuda
    stem = f"serve-{args.shape}-{device}" if w.kind == "lora" else f"serve-{args.shape}-{w.kind}-r{w.rank}-{device}"
    result = bench.run(serve_args, w, base_name, shape.vocab_size, tmp / "server.log", args.repeats)
    if device == "cuda":  # where a batch-64 decode step is bound by memory bandwidth
        result["roofline"] = bench.decode_roofline(shape, w)
    print(json.dumps({k: result[k] for k in ("adapters", "base", "adapters_over_base")}, indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # kept if the baseline below fails
    (Path(args.out) / f"{stem}.partial.json").write_text(
        json.dumps({"environment": report.environment(), **result}, indent=1)
    )
    if args.hf_baseline:  # transformers' generate on the same model and prompts, no adapters
        result.update(_hf_baseline(args, shape, w, device, result["adapters"]["output_tokens_per_s"]))
        print(json.dumps({k: v for k, v in result.items() if k.startswith("ours_over_hf")}, indent=1), flush=True)
        (Path(args.out) / f"{stem}.partial.json").write_text(
            json.dumps({"environment": report.environment(), **result}, indent=1)
        )
    if not args.no_peft and w.kind != "lora":
        result["peft_note"] = f"PEFT has no FLoRA adapters: --kind {w.kind}"
    elif not args.no_peft:
        peft_w = bench.Workload(
            **{
                **bench.asdict(w),
                "requests": args.peft_requests or w.requests,
                "output_len": args.peft_output_len or w.output_len,
            }
        )
        result["peft"] = bench.peft_baseline(
            hf_generate.hf_model(args.shape, shape, device), folders, peft_w, args.peft_batch, device
        )
        result["ours_over_peft"] = result["adapters"]["output_tokens_per_s"] / result["peft"]["output_tokens_per_s"]
    env = report.environment()
    payload = {"environment": env, **result}
    paths = report.write(args.out, stem, payload, serve_report.markdown(env, payload), serve_report.figure(payload))
    (Path(args.out) / f"{stem}.partial.json").unlink(missing_ok=True)
    print(serve_report.markdown(env, payload))
    print("wrote", *paths)


def _hf_baseline(args, shape, w, device: str, ours: float) -> dict:
    """``--hf-baseline``: transformers' compiled static-cache (CUDA) and eager ``generate`` on
    the server's model and prompts (bench/hf_generate.py), and ours with adapters over each."""
    import gc

    import torch

    from loraflow.bench import hf_generate
    from loraflow.bench import serve as bench

    model = hf_generate.hf_model(args.shape, shape, device)
    rows = hf_generate.baseline(model, bench.workload_prompts(w, shape.vocab_size), w.output_len, args.repeats)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the PEFT baseline builds its own model
    return {"hf_generate": rows, **hf_generate.ratios(rows, ours)}


def cmd_bench_train(args) -> None:
    """Peak memory, optimizer-state bytes and tokens/s of the optimizers on LLaMA sizes (GPU)."""

    import torch
    from tqdm import tqdm

    from loraflow.bench import report, train_report
    from loraflow.bench.train import TrainCase, run_case

    if args.merge:  # one report from the JSON files of several runs (e.g. 7B in a call of its own)
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [row for p in parts for row in p["cases"]]
        env = dict(parts[0]["environment"])
        env["command"] = " + ".join(p["environment"]["command"] for p in parts)
        env["date"] = ", ".join(dict.fromkeys(p["environment"]["date"] for p in parts))  # each part's, in order
        payload = {"environment": env, "targets": train_report.targets(rows), "cases": rows}
        print(
            "wrote",
            *report.write(
                args.out, f"train-{args.name}", payload, train_report.markdown(env, rows), train_report.figure(rows)
            ),
        )
        return
    if not torch.cuda.is_available() and not args.cpu:
        sys.exit("loraflow bench train measures GPU memory: run it on a CUDA machine (or --cpu for a smoke run)")
    ranks = {"tiny": 16, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
    cases = []
    for config in args.configs.split(","):
        for variant in args.variants.split(","):
            for per_layer in (False, True):
                cases.append(
                    TrainCase(
                        config,
                        variant,
                        per_layer,
                        ranks[config],
                        batch=args.batch,
                        accumulation=args.accumulation,
                        steps=args.steps,
                        state_dtype=args.state_dtype,
                        checkpointing=config == "7b",
                        svd=args.svd,
                    )
                )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    partial = Path(args.out) / f"train-{device}.partial.jsonl"  # each case as it ends: kept if the run is cut
    rows = []
    for c in tqdm(cases, desc="train cases"):
        rows.append(run_case(c, device, torch.bfloat16 if device == "cuda" else torch.float32))
        with open(partial, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    env = report.environment()
    payload = {"environment": env, "targets": train_report.targets(rows), "cases": rows}
    paths = report.write(
        args.out, f"train-{device}", payload, train_report.markdown(env, rows), train_report.figure(rows)
    )
    partial.unlink()
    print(train_report.markdown(env, rows).split("## Runs")[0])
    print("wrote", *paths)


def cmd_bench_finetune(args) -> None:
    """LoRA fine-tuning tokens/s against transformers + PEFT, and many tenants in one job against
    one after another; JSON, Markdown and PNG under --out."""
    from loraflow.bench import finetune, report

    result = finetune.run(args)
    env = report.environment()
    md = finetune.markdown(result, env)
    paths = report.write(args.out, "finetune", {"environment": env, **result}, md, finetune.figure(result))
    print(md)
    print("wrote", ", ".join(map(str, paths)))


def cmd_bench_deep_matrix(args) -> None:
    """The Deep LoRA paper's deep matrix completion: the original deep factorization against the
    compressed one, error curves and the wall-clock speed-up to equal error."""
    from loraflow.bench import deep_matrix

    deep_matrix.cmd(args)


def merge_kernel_parts(folder: str, out: str) -> None:
    """One report from the ``--part`` JSON files in ``folder`` (runs anywhere, no GPU)."""

    from loraflow.bench import kernels_report, report

    parts = sorted(Path(folder).glob("kernels.part*.json"))
    if not parts:
        sys.exit(f"no kernels.part*.json files in {folder}")
    loaded = [json.loads(p.read_text()) for p in parts]
    env = dict(loaded[0]["environment"])
    env["command"] = "; ".join(sorted({d["environment"]["command"] for d in loaded}))
    bandwidth = max(d["copy_bandwidth_gbs"] for d in loaded)
    by_key = {}  # a later part (e.g. a re-run of one kind) replaces the same case
    for d in sorted(loaded, key=lambda d: d["environment"]["date"]):
        for r in d["cases"]:
            by_key[tuple(r[k] for k in ("kind", "d_in", "d_out", "rows", "T", "rank", "mix"))] = r
    rows = list(by_key.values())
    for r in rows:  # one roofline for the whole report: the best bandwidth any part measured
        if "addon_bytes" in r:
            r["roofline_ms"] = r["addon_bytes"] / (bandwidth * 1e9) * 1e3
            r["addon_over_roofline"] = r["triton_addon_ms"] / r["roofline_ms"]
    payload = {
        "environment": env,
        "copy_bandwidth_gbs": bandwidth,
        "max_rel_error_bf16": max(d["max_rel_error_bf16"] for d in loaded),
        "targets": kernels_report.targets(rows),
        "cases": rows,
    }
    markdown = kernels_report.markdown(env, bandwidth, rows)
    paths = report.write(out, "kernels", payload, markdown, kernels_report.figure(rows))
    print(markdown.split("## decode")[0])
    print("wrote", *paths)
