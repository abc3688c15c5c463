"""Where the decode graph's launch cost comes from, inside the engine. With adapters, the host's
``replay()`` call of a Llama-2-7B decode step took 0.6-1.3 ms against 0.01-0.08 ms without
(engine_steps.py), while graphs of up to 8,192 PyTorch kernels, or of the same 448 LoRA
launches alone, or of LoRA launches between cuBLAS GEMMs, launched in under 0.14 ms
(graph_launch.py). This captures the engine's own decode step in variants, from one engine
with 64 adapters loaded: base or adapters; the graphs' shared memory pool or a pool of its
own; adapters on the first k layers only, or on one projection of every layer. Prints and
writes the launch call, the replay from idle and back to back for each. Found (session 6):
every variant launches in under 0.1 ms; the slow launches came from the profiler, which
engine_steps.py had run before them (``results/engine-launch-h200.json``).

    python benchmarks/scripts/engine_launch.py OUT.json
"""

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from engine_steps import decode_steps, replay_times  # this folder

import loraflow as lf
from loraflow.bench import serve as bench
from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes, numbered_tokenizer, random_llama


def capture(eng, path, pool):
    """The engine's decode step for its 64 buffered sequences, captured as DecodeGraphs does."""
    g = eng.graphs
    batch = g._batch(64, path)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            eng.model(batch, eng.kv.layers)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), torch.inference_mode():
        logits = eng.model(batch, eng.kv.layers)
    return graph, logits


def main():
    shape = LlamaArgs(**SHAPES["llama2-7b"])
    folders = bench.make_adapters(linear_shapes(shape), Path(tempfile.mkdtemp()), 64, 16, device="cuda")
    eng = lf.Engine(
        model=random_llama(shape, device="cuda"),
        tokenizer=numbered_tokenizer(shape.vocab_size),
        max_batch_tokens=4096,
        max_gpu_adapters=64,
        max_cpu_adapters=64,
        max_lora_rank=16,
        kv_cache_bytes=16 * 2**30,
        adapters={f"a{i}": str(f) for i, f in enumerate(folders)},
    )
    names = [f"a{i}" for i in range(64)]
    eng.graphs.kernel = "rows"  # the per-layer kernels (session 6 ran them as "rows-serial")
    rows = []
    # as engine_steps.py: the base model's steps, then the adapters' (warm-up and timed run each)
    step_ms = {
        "base": [1e3 * decode_steps(eng, [None] * 64, 128, 48) for _ in range(2)],
        "adapters": [1e3 * decode_steps(eng, names, 128, 48) for _ in range(2)],
    }
    key = eng.graphs.key(64, "rows")
    own = eng.graphs.graphs[key]
    rows.append({"variant": "adapters, the engine's own graph", "decode_step_ms": step_ms, **replay_times(own[0], 30)})
    print(rows[-1], flush=True)
    fresh = capture(eng, "rows", eng.graphs.pool)
    rows.append({"variant": "adapters, captured again now", **replay_times(fresh[0], 30)})
    print(rows[-1], flush=True)
    eng.graphs.graphs[key] = fresh  # the engine's steps through the new graph
    rows.append(
        {
            "variant": "adapters, engine steps through the graph captured again",
            "decode_step_ms": [1e3 * decode_steps(eng, names, 128, 48) for _ in range(2)],
            **replay_times(fresh[0], 30),
        }
    )
    print(rows[-1], flush=True)
    rows.append({"variant": "adapters, the engine's own graph again", **replay_times(own[0], 30)})
    print(rows[-1], flush=True)
    del own, fresh
    layers = eng.model.linear_layers()

    def measure(label, path, pool, active=None):
        saved = {n: m.packed.any_active for n, m in layers.items()}
        if active is not None:
            for n, m in layers.items():
                m.packed.any_active = saved[n] and active(n)
        graph, _ = capture(eng, path, pool)
        for n, m in layers.items():
            m.packed.any_active = saved[n]
        rows.append({"variant": label, **replay_times(graph, 30)})
        print(rows[-1], flush=True)
        del graph

    shared = eng.graphs.pool
    measure("base, shared pool", None, shared)
    measure("base, own pool", None, torch.cuda.graph_pool_handle())
    measure("adapters, shared pool", "rows", shared)
    measure("adapters, own pool", "rows", torch.cuda.graph_pool_handle())
    for k in (1, 4, 16):
        measure(
            f"adapters on layers 0-{k - 1}",
            "rows",
            torch.cuda.graph_pool_handle(),
            lambda n, k=k: int(n.split(".")[2]) < k,
        )
    for proj in ("q_proj", "down_proj"):
        measure(f"adapters on {proj} only", "rows", torch.cuda.graph_pool_handle(), lambda n, p=proj: n.endswith(p))
    eng.registry.close()
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/engine_launch.py {sys.argv[1]}",
        "rows": rows,
    }
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
