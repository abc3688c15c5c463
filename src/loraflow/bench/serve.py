"""``loraflow bench serve``: a load generator on loopback against the HTTP server, which
runs as its own process (``loraflow serve``), as it would in production.

Requests arrive as a Poisson process (``rate`` per second; 0: all at once), each names an
adapter drawn from a popularity mix (identical / uniform / skewed Zipf 1.5 / distinct) over
``adapters`` adapters, among ``registered`` registered names, and streams its output.
Reported: output tokens/s, time to first token and inter-token latency (p50, p99). The same
requests also run on the base model alone (no adapters), through Hugging Face
transformers + PEFT mixed-batch ``generate``, and with ``--hf-baseline`` through transformers'
compiled static-cache ``generate`` without adapters (``bench/hf_generate.py``) for comparison.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

KINDS = ("lora", "flora", "mixed")  # the adapters' kind: LoRA, FLoRA, or every other one FLoRA


@dataclass
class Workload:
    requests: int = 64
    rate: float = 0.0  # requests per second (Poisson); 0: all at once
    prompt_len: int = 128
    output_len: int = 128
    mix: str = "distinct"
    adapters: int = 64  # distinct adapters the requests draw from
    registered: int = 1000  # names registered on the server
    rank: int = 16
    kind: Literal["lora", "flora", "mixed"] = "lora"  # mixed: every other adapter FLoRA
    seed: int = 0
    files: int = 0  # adapter folders on disk that the names link to, round robin; 0: one per adapter

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.registered < self.adapters:
            raise ValueError(f"--registered ({self.registered}) must be at least --adapters ({self.adapters})")
        if not 0 <= self.files <= self.adapters:  # 0: one folder per adapter
            raise ValueError(f"--adapter-files must be between 1 and --adapters ({self.adapters}), got {self.files}")

    @property
    def folders(self) -> int:
        """Adapter folders written: distinct names beyond them share files but load one by one."""
        return self.files or self.adapters


def make_adapters(
    shapes: dict[str, tuple[int, int]],
    folder: Path,
    n: int,
    rank: int,
    seed: int = 0,
    dtype=torch.bfloat16,
    device: str = "cpu",
    kind: str = "lora",
) -> list[Path]:
    """``n`` random adapters on all linear layers, rank ``rank``, in PEFT's layout: LoRA
    (A ~ N(0, 1/d_in), B ~ N(0, 0.02²)), FLoRA (``adapters/flora.py``: A, B ~ 1 + N(0, 0.1²),
    so M = BA/r stays near one), or ``mixed`` (odd ones FLoRA). The values are drawn on
    ``device`` (a GPU draws 64 of Llama-2-7B's 80 MB adapters in a moment where the CPU takes
    minutes); the same seed gives the same adapters on a device."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    g = torch.Generator(device).manual_seed(seed)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in shapes})
    out = []
    for i in range(n):
        flora = kind == "flora" or (kind == "mixed" and i % 2 == 1)
        path = folder / f"rand{i}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (d_out, d_in) in shapes.items():
            if flora:  # W = W0 ∘ (1/r) B A
                a = 1 + 0.1 * torch.randn(rank, d_in, generator=g, device=device)
                b = 1 + 0.1 * torch.randn(d_out, rank, generator=g, device=device)
            else:  # W = W0 + B A
                a = torch.randn(rank, d_in, generator=g, device=device) / d_in**0.5
                b = torch.randn(d_out, rank, generator=g, device=device) * 0.02
            suffix = "flora" if flora else "lora"
            tensors[f"base_model.model.{module}.{suffix}_A.weight"] = a.to(dtype).cpu()
            tensors[f"base_model.model.{module}.{suffix}_B.weight"] = b.to(dtype).cpu()
        save_file(tensors, path / "adapter_model.safetensors")
        fields = {"r": rank, "target_modules": leaves, "task_type": "CAUSAL_LM"}
        fields |= {"peft_type": "FLORA", "init_noise": 0.0} if flora else {"peft_type": "LORA", "lora_alpha": rank}
        (path / "adapter_config.json").write_text(json.dumps(fields))
        out.append(path)
    return out


def popularity(mix: str, n_requests: int, n_adapters: int, rng: random.Random) -> list[int]:
    if mix == "identical":
        return [0] * n_requests
    if mix == "uniform":
        k = math.ceil(math.sqrt(n_adapters))
        return [rng.randrange(k) for _ in range(n_requests)]
    if mix == "skewed":
        w = [1 / (i + 1) ** 1.5 for i in range(n_adapters)]
        return rng.choices(range(n_adapters), weights=w, k=n_requests)
    if mix == "distinct":
        return [i % n_adapters for i in range(n_requests)]
    raise ValueError(f"mix must be identical, uniform, skewed or distinct, got {mix!r}")


def decode_roofline(shape, w: Workload, bytes_per_value: int = 2) -> dict:
    """Bytes a decode step of the whole batch must read, and the adapters/base throughput
    ratio when both decode at the memory bandwidth (``ratio_bound``; an engine whose base
    steps are slower than that can measure a higher ratio): weights once,
    every sequence's cached keys and values (at the average context of the run), and each
    distinct adapter in the batch once (rank x (d_in + d_out) per adapted layer)."""
    from loraflow.serve.llama import linear_shapes

    layers = linear_shapes(shape)
    params = sum(o * i for o, i in layers.values()) + 2 * shape.vocab_size * shape.dim
    kv_per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * bytes_per_value
    context = w.prompt_len + w.output_len / 2
    distinct = len(set(popularity(w.mix, w.requests, w.adapters, random.Random(w.seed))))
    weights = params * bytes_per_value
    kv = w.requests * context * kv_per_token
    adapters = distinct * w.rank * sum(o + i for o, i in layers.values()) * bytes_per_value
    return {
        "weights_gb": weights / 1e9,
        "kv_gb": kv / 1e9,
        "adapters_gb": adapters / 1e9,
        "distinct_adapters": distinct,
        "ratio_bound": (weights + kv) / (weights + kv + adapters),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _one(client, model: str, prompt: list[int], w: Workload, start_at: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, start_at - (time.perf_counter() - t0)))
    sent = time.perf_counter()
    times, tokens = [], 0
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": w.output_len,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("text"):
                times.append(time.perf_counter())
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {
        "ttft": times[0] - sent if times else float("nan"),
        "itl": [b - a for a, b in zip(times, times[1:])],
        "tokens": tokens,
        "done": time.perf_counter(),
    }


async def _load(url: str, models: list[str], prompts: list[list[int]], w: Workload) -> tuple[list[dict], float]:
    import httpx

    rng = random.Random(w.seed + 1)
    starts, t = [], 0.0
    for _ in models:
        starts.append(t)
        t += rng.expovariate(w.rate) if w.rate > 0 else 0.0
    limits = httpx.Limits(max_connections=w.requests + 8, max_keepalive_connections=w.requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_one(client, m, p, w, s, t0) for m, p, s in zip(models, prompts, starts)])
    return results, t0


def summarize(results: list[dict], t0: float) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    wall = max(r["done"] for r in ok) - t0 if ok else float("nan")
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok]
    total = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tokens": total,
        "wall_s": wall,
        "output_tokens_per_s": total / wall if ok else 0.0,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p99_ms": 1e3 * percentile(itl, 99),
    }


def workload_prompts(w: Workload, vocab: int, rng: random.Random | None = None) -> list[list[int]]:
    """The workload's prompts: ``requests`` lists of ``prompt_len`` token ids in [3, vocab),
    drawn from ``rng`` (default: a new one seeded with ``w.seed``, as the server's runs)."""
    rng = random.Random(w.seed) if rng is None else rng
    return [[rng.randrange(3, vocab) for _ in range(w.prompt_len)] for _ in range(w.requests)]


def name_folders(folder: Path, adapter_folders: list[Path], registered: int) -> Path:
    """``registered`` adapter names a0, a1, ... as links to ``adapter_folders`` (round robin):
    the server's ``--adapter-dir``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(registered):
        (folder / f"a{i}").symlink_to(adapter_folders[i % len(adapter_folders)].resolve(), target_is_directory=True)
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(serve_args: list[str], w: Workload, base_name: str, vocab: int, log: Path, repeats: int = 3) -> dict:
    """Start ``loraflow serve`` (with ``serve_args``) in its own process on loopback, run the
    workload with adapters a0.. and on the base model, ``repeats`` times in turn, and stop
    the server. Each kind's figures are from its run of median throughput; the ratio is
    theirs (one run of a few seconds varies by up to 20% on the H200, NOTES-serve.md)."""
    import subprocess
    import sys
    import urllib.request

    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    port = _free_port()
    cmd = [sys.executable, "-m", "loraflow.cli", "serve", "--port", str(port), *serve_args]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the server did not start in 15 minutes; see {log}") from None
                time.sleep(0.5)
        rng = random.Random(w.seed)
        prompts = workload_prompts(w, vocab, rng)
        chosen = [f"a{i}" for i in popularity(w.mix, w.requests, w.adapters, rng)]
        # warm-up, untimed: the whole workload once per kind compiles the kernels, brings every
        # used adapter to the device and captures the decode graphs of every batch size the
        # timed runs meet (requests start and finish at different steps, so the batch passes
        # through several sizes; a warm-up of 4 output tokens left some of those captures to
        # the first timed run of each kind, NOTES-serve.md)
        asyncio.run(_load(url, chosen, prompts, w))
        asyncio.run(_load(url, [base_name] * w.requests, prompts, w))
        pairs = []  # (with adapters, base only), back to back, ``repeats`` times
        for _ in range(repeats):
            pairs.append(tuple(_timed(url, names, prompts, w) for names in (chosen, [base_name] * w.requests)))
        metrics = _metrics(url)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    registry = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("loraflow_adapter", "loraflow_graph_", "loraflow_decode_", "loraflow_prompt_"))
    }
    with_adapters, base_only = median_run([a for a, _ in pairs]), median_run([b for _, b in pairs])
    return {
        "workload": asdict(w),
        "repeats": repeats,
        "adapters": with_adapters,
        "base": base_only,
        "adapters_over_base": with_adapters["output_tokens_per_s"] / base_only["output_tokens_per_s"],
        "pairs": [
            {
                "adapters_tokens_per_s": a["output_tokens_per_s"],
                "base_tokens_per_s": b["output_tokens_per_s"],
                "ratio": a["output_tokens_per_s"] / b["output_tokens_per_s"],
                "steps": {
                    kind: {k: r[k] for k in r if k.endswith(("_steps", "_step_ms", "_captures", "_capture_s"))}
                    for kind, r in (("adapters", a), ("base", b))
                },  # fmt: skip
            }
            for a, b in pairs
        ],
        "server": registry,
    }


STEP_KINDS = ("graph", "decode", "prompt")  # the engine's steps: captured decode, eager decode, with prompt tokens


def _metrics(url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()


def _step_counters(metrics: str) -> dict[str, float]:
    """The engine's step counts and seconds by kind, from /metrics' text."""
    names = {f"loraflow_{k}_{c}" for k in STEP_KINDS for c in ("steps_total", "step_seconds_total")}
    names |= {"loraflow_graph_captures_total", "loraflow_graph_capture_seconds_total"}
    fields = (line.split() for line in metrics.splitlines())
    return {f[0]: float(f[1]) for f in fields if len(f) == 2 and f[0] in names}


def _timed(url: str, names: list[str], prompts: list[list[int]], w: Workload) -> dict:
    """One timed run of the workload, with the engine's steps it took by kind (from the server's
    /metrics before and after): how many, and their mean milliseconds (model and tokens)."""
    before = _step_counters(_metrics(url))
    run = summarize(*asyncio.run(_load(url, names, prompts, w)))
    after = _step_counters(_metrics(url))
    for kind in STEP_KINDS:
        n, sec = (after.get(name, 0.0) - before.get(name, 0.0) for name in (
            f"loraflow_{kind}_steps_total", f"loraflow_{kind}_step_seconds_total"))  # fmt: skip
        run[f"{kind}_steps"] = int(n)
        run[f"{kind}_step_ms"] = 1e3 * sec / n if n else None
    captures = after.get("loraflow_graph_captures_total", 0.0) - before.get("loraflow_graph_captures_total", 0.0)
    run["graph_captures"] = int(captures)  # inside the graph steps above: seconds each, as a rule
    run["graph_capture_s"] = after.get("loraflow_graph_capture_seconds_total", 0.0) - before.get(
        "loraflow_graph_capture_seconds_total", 0.0
    )
    return run


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["output_tokens_per_s"])[(len(runs) - 1) // 2]


def peft_baseline(hf_model, adapter_folders: list[Path], w: Workload, batch: int, device) -> dict:
    """Hugging Face transformers + PEFT: the same kind of requests, ``batch`` rows per
    mixed-batch ``generate`` call, each row with its own adapter."""
    from peft import PeftModel

    n = min(w.adapters, len(adapter_folders))
    model = PeftModel.from_pretrained(hf_model, adapter_folders[0], adapter_name="a0")
    for i in range(1, n):
        model.load_adapter(adapter_folders[i], adapter_name=f"a{i}")
    model = model.to(device).eval()
    rng = random.Random(w.seed)
    vocab = hf_model.config.vocab_size
    rows = popularity(w.mix, w.requests, n, rng)
    total, start = 0, time.perf_counter()
    for lo in range(0, w.requests, batch):
        group = rows[lo : lo + batch]
        ids = torch.randint(3, vocab, (len(group), w.prompt_len), device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=w.output_len,
                min_new_tokens=w.output_len,
                do_sample=False,
                adapter_names=[f"a{i}" for i in group],
                pad_token_id=0,
            )
        total += (out.shape[1] - ids.shape[1]) * len(group)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "requests": w.requests,
        "batch": batch,
        "output_tokens": total,
        "wall_s": wall,
        "output_tokens_per_s": total / wall,
    }
