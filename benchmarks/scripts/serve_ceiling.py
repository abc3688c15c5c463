"""The server's own ceiling: 64 greedy streams of prompt 32 + N output tokens against a running
`loraflow serve --random-weights tiny` (next to no model), run after run; prints output tok/s,
TTFT p50 and ITL p50 of each run. benchmarks/scripts/serve_ceiling.sh profiles the server meanwhile.

    python benchmarks/scripts/serve_ceiling.py URL OUTPUT_TOKENS RUNS MODEL
"""

import asyncio
import random
import sys

from loraflow.bench import serve as bench

url, output_len, runs, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
w = bench.Workload(
    requests=64, rate=0, prompt_len=32, output_len=output_len, mix="distinct", adapters=1, registered=1, rank=16
)
prompts = bench.workload_prompts(w, 32000, random.Random(0))
for _ in range(runs):
    s = bench.summarize(*asyncio.run(bench._load(url, [model] * w.requests, prompts, w)))
    print({k: s[k] for k in ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms")}, flush=True)
