"""The engine's host work per decode step with and without adapters, the model stubbed out
(CPU): 64 requests of a 128-token prompt decoding 64 tokens through the decode-graph path
(run eagerly on the CPU), each request on its own rank-4 adapter or on the base model,
measured twice in alternation. Shows whether adapters add host work to a decode step.

    python benchmarks/scripts/engine_host_adapters.py
"""

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

args = LlamaArgs(**SHAPES["tiny"])  # next to no model: the host's work
folders = bench.make_adapters(linear_shapes(args), Path(tempfile.mkdtemp()), 64, 4, device="cpu")
eng = lf.Engine(
    model=random_llama(args, dtype=torch.float32),
    tokenizer=numbered_tokenizer(32000),
    device="cpu",
    max_batch_tokens=4096,
    decode_graphs=True,
    max_gpu_adapters=64,
    max_cpu_adapters=64,
    max_lora_rank=4,
    adapters={f"a{i}": str(f) for i, f in enumerate(folders)},
)
logits = torch.zeros(512, 32000)
eng.graphs.model = lambda batch, caches: logits[: len(batch.tokens)]  # no model: host work only
print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, torch {torch.__version__}")
for run, mode in enumerate(["adapters", "base", "adapters", "base"]):
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    reqs = [
        eng.add_request(
            [3 + i + j for j in range(128)], params, f"a{i}" if mode == "adapters" else None, on_output=eng.stream_text
        )
        for i in range(64)
    ]
    while any(r.computed < 128 for r in reqs):  # prefill, and the first run's adapter loads
        eng.step()
    steps, start = 0, time.perf_counter()
    while eng.has_work():
        eng.step()
        steps += 1
    print(
        f"run {run + 1}, {mode:<8}: {steps} decode steps, {(time.perf_counter() - start) / steps * 1e3:.2f} ms a step"
    )
