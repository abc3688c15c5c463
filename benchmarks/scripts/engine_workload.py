"""The engine alone, no HTTP, on the serving benchmark's workload: all requests arrive at
once, each with its own prompt and adapter, and the engine steps until all are done. Prints
and writes the wall time and where it went (steps with prompt chunks vs decode-only steps),
base model vs distinct rank-16 adapters, on a Llama-2-7B-shaped model (random weights).

    python benchmarks/scripts/engine_workload.py OUT.json [--requests 64] [--prompt-len 1024] [--output-len 128]
"""

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import loraflow as lf
from loraflow.bench import serve as bench
from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes, numbered_tokenizer, random_llama
from loraflow.serve.sampling import SamplingParams


def run(eng, adapters, prompt_len, output_len) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    reqs = [
        eng.add_request([3 + (7 * i + j) % 30000 for j in range(prompt_len)], params, a) for i, a in enumerate(adapters)
    ]
    spent = {f"{k}_{v}": 0 for k in ("chunk", "decode", "idle") for v in ("steps", "s")}
    t0 = time.perf_counter()
    while not all(r.finished for r in reqs):
        before = [r.computed for r in reqs]
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        moved = [r.computed - c for r, c in zip(reqs, before)]
        kind = "idle" if not any(moved) else "decode" if max(moved) == 1 else "chunk"  # idle: adapters loading
        spent[f"{kind}_steps"] += 1
        spent[f"{kind}_s"] += time.perf_counter() - t
    wall = time.perf_counter() - t0
    return {**spent, "wall_s": wall, "output_tokens_per_s": len(reqs) * output_len / wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    shape = LlamaArgs(**SHAPES["llama2-7b"])
    folders = bench.make_adapters(linear_shapes(shape), Path(tempfile.mkdtemp()), args.requests, 16, device="cuda")
    eng = lf.Engine(
        model=random_llama(shape, device="cuda"),
        tokenizer=numbered_tokenizer(shape.vocab_size),
        max_batch_tokens=4096,
        max_gpu_adapters=args.requests,
        max_cpu_adapters=args.requests,
        max_lora_rank=16,
        kv_cache_bytes=48 * 2**30,
        adapters={f"a{i}": str(f) for i, f in enumerate(folders)},
    )
    rows = {}
    for name, adapters in (("adapters", [f"a{i}" for i in range(args.requests)]), ("base", [None] * args.requests)):
        run(eng, adapters, args.prompt_len, 4)  # warm-up: loads, compiles, captures
        rows[name] = run(eng, adapters, args.prompt_len, args.output_len)
        print(name, rows[name], flush=True)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/engine_workload.py {args.out} --requests {args.requests} "
        f"--prompt-len {args.prompt_len} --output-len {args.output_len}",
        **rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
