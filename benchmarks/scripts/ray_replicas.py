"""Issue 28's measurement: `loraflow serve --ray` with two replicas on one GPU against one
replica (and against the single-process server), many adapters in a skewed mix: output
tokens/s, and the fraction of requests served without an adapter load (their adapter was in
the replica's host memory or on its device when they arrived: the servers' own
``loraflow_adapter_requests_without_load_total`` over ``loraflow_adapter_requests_total``,
counted over the timed runs only).

    .venv/bin/python benchmarks/scripts/ray_replicas.py                  # on the GPU machine
    .venv/bin/python benchmarks/scripts/ray_replicas.py --shape tiny --adapters 8 --requests 16 \\
        --output-len 8 --repeats 1 --kv-cache-gb 0.25                    # a CPU smoke run

Each setup is its own server process on loopback (`loraflow serve`, plus `--ray --ray-replicas
N --ray-replica-gpus 1/N`, a Ray cluster of its own started and stopped by it), each replica
with the same --max-cpu-adapters and --max-gpu-adapters: two replicas hold twice the adapters
between them when Serve's multiplexing keeps each adapter's requests on one replica. The
workload is `loraflow bench serve`'s (bench/serve.py): Poisson arrivals (0: all at once),
streamed completions, a warm-up run first, then --repeats timed runs (the median reported).
Writes ray-replicas-<shape>-<device>.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from loraflow.bench import report
from loraflow.bench import serve as bench
from loraflow.deploy.metrics import samples
from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes


def counters(url: str) -> dict[str, dict[str, float]]:
    """The adapter-request counters and hit rates of /metrics, by label set ("" the sum)."""
    page = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    names = ("loraflow_adapter_requests_total", "loraflow_adapter_requests_without_load_total")
    out = {n: samples(page, n) for n in names + ("loraflow_adapter_hit_rate", "loraflow_adapter_loads_total")}
    out["by_adapter"] = samples(page, "loraflow_requests_by_adapter_total")
    return out


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 1800) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the server did not start within {timeout:.0f} s; see {log}")
        time.sleep(1)


def one_setup(label: str, extra: list[str], base: list[str], w: bench.Workload, vocab: int, out: Path, repeats: int):
    port = bench._free_port()
    url = f"http://127.0.0.1:{port}"
    log = out / f"ray-replicas-{label}.log"
    cmd = [sys.executable, "-m", "loraflow.cli", "serve", "--port", str(port), "--no-log-requests", *base, *extra]
    print(label, " ".join(cmd[3:]), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, log)
        rng = random.Random(w.seed)
        prompts = bench.workload_prompts(w, vocab, rng)
        chosen = [f"a{i}" for i in bench.popularity(w.mix, w.requests, w.adapters, rng)]
        asyncio.run(bench._load(url, chosen, prompts, w))  # warm-up, untimed
        runs = []
        for _ in range(repeats):
            before = counters(url)
            summary = bench.summarize(*asyncio.run(bench._load(url, chosen, prompts, w)))
            after = counters(url)
            delta = {
                n: after[n].get("", 0.0) - before[n].get("", 0.0)
                for n in ("loraflow_adapter_requests_total", "loraflow_adapter_requests_without_load_total")
            }
            summary["adapter_requests"] = delta["loraflow_adapter_requests_total"]
            summary["without_load"] = delta["loraflow_adapter_requests_without_load_total"]
            summary["fraction_without_load"] = summary["without_load"] / max(summary["adapter_requests"], 1)
            summary["per_replica_hit_rate"] = {k: v for k, v in after["loraflow_adapter_hit_rate"].items() if k}
            runs.append(summary)
            print(label, json.dumps({k: summary[k] for k in ("output_tokens_per_s", "fraction_without_load")}))
        by_adapter = counters(url)["by_adapter"]
        spread = {}  # adapter -> replicas that ran it (Ray setups)
        for labels in by_adapter:
            fields = dict(p.split("=", 1) for p in labels.split(","))
            if "replica" in fields:
                spread.setdefault(fields["adapter"], set()).add(fields["replica"])
    finally:
        proc.terminate()
        proc.wait(timeout=300)
    result = dict(bench.median_run(runs))
    result["runs"] = runs
    if spread:
        result["adapters_on_more_than_one_replica"] = sum(len(v) > 1 for v in spread.values())
        result["adapters_seen"] = len(spread)
    return result


def markdown(env: dict, payload: dict) -> str:
    w = payload["workload"]
    lines = [
        f"# `loraflow serve --ray`: replicas on one {env['device']} ({payload['shape']})",
        "",
        f"{env['date']}; `{env['command']}`; torch {env['torch']}, ray {payload['ray']}.",
        "",
        f"{w['requests']} requests (rate {w['rate']}/s, 0: all at once), {w['prompt_len']}-token prompts, "
        f"{w['output_len']} output tokens, {w['adapters']} adapters of rank {w['rank']} in a {w['mix']} mix; "
        f"per replica {payload['max_cpu_adapters']} adapters in host memory, {payload['max_gpu_adapters']} on "
        f"the device. Median of {payload['repeats']} timed runs after a warm-up. Written by "
        "`benchmarks/scripts/ray_replicas.py`.",
        "",
        "| setup | output tok/s | served without an adapter load | adapters on >1 replica |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, r in payload["setups"].items():
        spread = f"{r['adapters_on_more_than_one_replica']} of {r['adapters_seen']}" if "adapters_seen" in r else "-"
        lines.append(
            f"| {label} | {r['output_tokens_per_s']:.0f} | {r['fraction_without_load']:.3f} "
            f"({r['without_load']:.0f}/{r['adapter_requests']:.0f}) | {spread} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="random-weight model shape")
    p.add_argument("--replicas", default="1,2", help="Ray replica counts to run, comma-separated (all on one GPU)")
    p.add_argument("--no-plain", action="store_true", help="skip the single-process server")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--mix", default="skewed", choices=["identical", "uniform", "skewed", "distinct"])
    p.add_argument("--adapters", type=int, default=256, help="distinct adapters (all registered)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-cpu-adapters", type=int, default=64, help="per replica (and Serve's LRU per replica)")
    p.add_argument("--max-gpu-adapters", type=int, default=16, help="per replica")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=float, default=8.0, help="per replica: two share the GPU's memory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = LlamaArgs(**SHAPES[args.shape])
    w = bench.Workload(
        requests=args.requests,
        rate=args.rate,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        mix=args.mix,
        adapters=args.adapters,
        registered=args.adapters,
        rank=args.rank,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="loraflow-ray-bench-"))
    folders = bench.make_adapters(linear_shapes(shape), tmp / "pool", w.adapters, w.rank, device=device)
    names = bench.name_folders(tmp / "names", folders, w.registered)
    base = [
        "--random-weights",
        args.shape,
        "--adapter-dir",
        str(names),
        "--max-cpu-adapters",
        str(args.max_cpu_adapters),
        "--max-gpu-adapters",
        str(args.max_gpu_adapters),
        "--max-lora-rank",
        str(w.rank),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-waiting",
        str(4 * w.requests + 64),
        "--kv-cache-gb",
        str(args.kv_cache_gb),
    ]
    setups = {} if args.no_plain else {"one process": []}
    for n in (int(x) for x in args.replicas.split(",")):
        gpus = ["--ray-replica-gpus", f"{1 / n:g}"] if device == "cuda" else ["--ray-replica-cpus", f"{1 / n:g}"]
        setups[f"ray, {n} replica{'s' * (n > 1)}"] = ["--ray", "--ray-replicas", str(n), *gpus]
    results = {}
    for label, extra in setups.items():
        tag = label.replace(", ", "-").replace(" ", "-")
        results[label] = one_setup(tag, extra, base, w, shape.vocab_size, out, args.repeats)
    env = report.environment()
    payload = {
        "environment": env,
        "shape": args.shape,
        "workload": bench.asdict(w),
        "repeats": args.repeats,
        "max_cpu_adapters": args.max_cpu_adapters,
        "max_gpu_adapters": args.max_gpu_adapters,
        "setups": results,
        "ray": __import__("ray").__version__,
    }
    stem = f"ray-replicas-{args.shape}-{device}"
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text(markdown(env, payload))
    print(markdown(env, payload))
    print("wrote", out / f"{stem}.json", out / f"{stem}.md")


if __name__ == "__main__":
    main()
