"""The engine alone, no HTTP: seconds per decode step of a Llama-2-7B-shaped model (random
weights) with 64 requests, base model vs 64 distinct rank-16 adapters on all linear layers,
with and without CUDA-graph decode (the adapters through each decode kernel: "siblings",
q/k/v and gate/up sharing a shrink and an expand launch, "rows", a shrink and an expand a
layer, or "fused", one launch a layer), and the captured step replayed
alone: back to back (the GPU's share of a step), and one at a time from an idle GPU (the
host's launch call, and launch to finish: what a step pays); with --profile, also the GPU
time of each kernel of the replayed steps (OUT.kernels.txt). Separates the engine's cost
from the server's, and the host's from the GPU's.

    python benchmarks/scripts/engine_steps.py OUT.json [--requests 64] [--prompt-len 128] [--steps 48]
        [--kv-cache-gb 16] [--graphs-only] [--profile]
"""

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import loraflow as lf
from loraflow.bench import serve as bench
from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes, numbered_tokenizer, random_llama
from loraflow.serve.sampling import SamplingParams


def decode_steps(eng, adapters, prompt_len, n_steps):
    """Median seconds of the decode-only steps of one batch of requests."""
    params = SamplingParams(max_tokens=n_steps + 1, temperature=0.0, ignore_eos=True)
    reqs = [
        eng.add_request([3 + (7 * i + j) % 30000 for j in range(prompt_len)], params, a) for i, a in enumerate(adapters)
    ]
    times = []
    while not all(r.finished for r in reqs):
        # a decode step: every running request one token from its end (or, overlapped, its token in flight)
        decode = (
            bool(eng.running)
            and not eng.waiting
            and not eng._incoming
            and all(len(r.ids) - r.computed <= 1 for r in eng.running)
        )
        t = time.perf_counter()  # no synchronize: a step waits for its tokens, or (overlapped) the previous step's
        eng.step()
        if decode:
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def mixed_step(eng, adapters, prompt_len, long_len, profile):
    """Seconds of one eager step holding a decode token of each of len(adapters) - 1 requests and
    a chunk of one new long prompt (the server's steps while requests arrive), and with
    ``profile`` its table of CUDA kernel time. Returns (seconds, table or None)."""
    params = SamplingParams(max_tokens=eng.max_len - max(prompt_len, long_len), temperature=0.0, ignore_eos=True)
    reqs = [
        eng.add_request([3 + (7 * i + j) % 30000 for j in range(prompt_len)], params, a)
        for i, a in enumerate(adapters[:-1])
    ]
    while any(r.computed < len(r.prompt_ids) for r in reqs) or eng.waiting or eng._incoming:
        eng.step()
    reqs.append(eng.add_request([5 + j % 30000 for j in range(long_len)], params, adapters[-1]))
    torch.cuda.synchronize()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None
    t = time.perf_counter()
    with prof or contextlib.nullcontext():
        eng.step()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    for r in reqs:
        eng.abort(r.id)
    while eng.has_work():
        eng.step()
    table = (
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70) if prof else None
    )
    return seconds, table


def kernel_table(graph, replays: int = 5) -> str:
    """GPU time per kernel over `replays` replays of a captured step, top kernels first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


def replay_times(graph, n: int = 20) -> dict:
    """Milliseconds of a captured step: replayed back to back (GPU time per replay, launches
    overlapped), and one at a time from an idle GPU: the host's ``replay()`` call alone and
    launch to finish (median)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    launch, single = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        launch.append(t1 - t0)
        single.append(time.perf_counter() - t0)
    return {
        "graph_replay_ms": start.elapsed_time(end) / n,
        "graph_launch_call_ms": 1e3 * statistics.median(launch),
        "graph_single_replay_ms": 1e3 * statistics.median(single),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="random weights of this shape")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--kv-cache-gb", type=float, default=16, help="KV cache; 1,024-token prompts need 48")
    ap.add_argument("--graphs-only", action="store_true", help="skip the eager steps (no CUDA graphs)")
    ap.add_argument(
        "--profile", action="store_true", help="also write OUT.kernels.txt: GPU time per kernel of the replayed graphs"
    )
    ap.add_argument("--kernels", default="siblings,rows,fused", help="decode LoRA kernels to time, comma-separated")
    ap.add_argument(
        "--attention",
        default="1x4",
        help="paged attention tilings to time, comma-separated SPLITSxWARPS: programs per (sequence, KV head) "
        "and warps each (default: the engine's 1x4)",
    )
    ap.add_argument(
        "--overlap",
        default="on",
        help="on, off or on,off: decode steps queued before the previous step's tokens are read (Engine overlap)",
    )
    ap.add_argument(
        "--default-model",
        action="store_true",
        help="the embedded SmolLM2-135M with the three example adapters (cycled over the requests), not Llama-2-7B",
    )
    ap.add_argument("--no-compile", action="store_true", help="element-wise work eager (compile_pointwise=False)")
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    tilings = [tuple(int(v) for v in t.split("x")) for t in args.attention.split(",")]
    overlaps = [{"on": True, "off": False}[v] for v in args.overlap.split(",")]
    if args.default_model:  # the host's share dominates a 135M model's step
        model = tokenizer = None
        examples = sorted(p for p in (Path(__file__).parents[2] / "examples" / "adapters").iterdir() if p.is_dir())
        folders = [examples[i % len(examples)] for i in range(args.requests)]
        adapters_name = f"{args.requests} slots of the {len(examples)} example adapters"
    else:
        shape = LlamaArgs(**SHAPES[args.shape])
        tmp = Path(tempfile.mkdtemp())
        folders = bench.make_adapters(linear_shapes(shape), tmp, args.requests, 16, device="cuda")
        model, tokenizer = random_llama(shape, device="cuda"), numbered_tokenizer(shape.vocab_size)
        adapters_name = f"{args.requests} distinct r16"
    rows, profiles, engines, to_profile = [], [], [], []
    for graphs in (True,) if args.graphs_only else (True, False):
        slots = args.requests
        eng = lf.Engine(
            model=model,
            tokenizer=tokenizer,
            max_batch_tokens=4096,
            max_gpu_adapters=slots,
            max_cpu_adapters=slots,
            max_lora_rank=16,
            decode_graphs=graphs,
            kv_cache_bytes=int(args.kv_cache_gb * 2**30),
            adapters={f"a{i}": str(f) for i, f in enumerate(folders)},
            compile_pointwise=not args.no_compile,
        )
        distinct = [f"a{i}" for i in range(args.requests)]
        runs = []
        for tiling in tilings if graphs else tilings[:1]:
            for overlap in overlaps if graphs else [False]:
                runs += [("base", [None] * args.requests, kernels[0], tiling, overlap)]
                runs += [(adapters_name, distinct, k, tiling, overlap) for k in (kernels if graphs else kernels[:1])]
        engines.append(eng)
        for name, adapters, kernel, tiling, overlap in runs:
            eng.overlap = overlap
            if graphs:
                eng.graphs.kernel = kernel
                eng.graphs.attention_splits, eng.graphs.attention_warps = tiling
            # warm-up over the same steps: loads, compiles, captures, and meets every shape the
            # timed run meets (a backend that plans per shape must not bill whichever run is first)
            try:
                decode_steps(eng, adapters, args.prompt_len, args.steps)
            except Exception as e:  # a kernel that fails on this GPU: recorded, the other runs go on
                rows.append(
                    {"graphs": graphs, "adapters": name, "kernel": kernel, "tiling": tiling, "error": repr(e)[:500]}
                )
                print(rows[-1], flush=True)
                eng.graphs.kernel = "rows"
                for r in list(eng.running) + list(eng.waiting):
                    eng.abort(r.id)
                while eng.has_work():
                    eng.step()
                continue
            s = decode_steps(eng, adapters, args.prompt_len, args.steps)
            path = None if not adapters[0] else "rows"
            row = {
                "graphs": graphs,
                "bank_slots": slots,
                "adapters": name,
                "path": path,
                "kernel": kernel if path and graphs else None,
                "attention_splits_warps": list(tiling) if graphs else None,
                "overlap": overlap,
                "decode_step_ms": 1e3 * s,
                "tokens_per_s": args.requests / s,
            }
            if graphs:  # the captured step replayed alone (writes only freed cache blocks)
                graph = eng.graphs.graphs[eng.graphs.key(args.requests, path)][0]
                row.update(replay_times(graph))
                to_profile.append((eng, f"## {name}, path {path}, kernel {row['kernel']}, tiling {tiling}\n", graph))
            if not graphs:  # an eager step of 63 decode tokens and a new 4,000-token prompt
                mixed_step(eng, adapters, args.prompt_len, 4000, False)  # warm-up
                row["mixed_step_ms"] = 1e3 * statistics.median(
                    mixed_step(eng, adapters, args.prompt_len, 4000, False)[0] for _ in range(3)
                )
                to_profile.append((eng, f"## mixed step, {name}\n", adapters))
            rows.append(row)
            print(rows[-1], flush=True)
    # profiled after every run is timed: once the profiler has run, every CUDA call of the
    # process costs the host more (a decode graph's launch up to ~1 ms: the adapters' "launch
    # cost" of sessions 4 and 5, whose runs came after the base model's profile)
    for eng, title, what in to_profile if args.profile else []:
        table = mixed_step(eng, what, args.prompt_len, 4000, True)[1] if isinstance(what, list) else kernel_table(what)
        profiles.append(title + table)
    for eng in engines:
        eng.registry.close()
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/engine_steps.py {args.out} --shape {args.shape} "
        f"--requests {args.requests} "
        f"--prompt-len {args.prompt_len} --steps {args.steps} --kv-cache-gb {args.kv_cache_gb:g}"
        + " --graphs-only" * args.graphs_only
        + " --profile" * args.profile
        + f" --kernels {args.kernels}"
        + " --no-compile" * args.no_compile
        + f" --attention {args.attention}"
        + " --default-model" * args.default_model,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    if profiles:
        Path(args.out).with_suffix(".kernels.txt").write_text(out["command"] + "\n\n" + "\n\n".join(profiles))


if __name__ == "__main__":
    main()
