"""What a CUDA graph's launch costs the host, by what the graph holds: n small PyTorch ops, or
n (shrink, expand) pairs of the per-row LoRA kernels, or both. The decode step's graph
with adapters took 0.65 ms to launch against 0.08 ms without, and halving its Triton
launches did not change that (NOTES-serve.md, session 4; session 6 found the cause: a
profiler run earlier in the process, not the graphs); this separates a cost per node,
per Triton node, or a threshold in the number of nodes. Session 5 found none of these
(up to 1,344 nodes launched in 0.04 ms); the engine's decode graphs hold about 1,300
(base) to 1,800 (adapters) kernels, so the PyTorch-only kind now goes up to 8,192, and two
more kinds copy one decode step's LoRA launches at Llama-2-7B's shapes (32 layers x q, k, v, o, gate, up,
down; 64 slots of rank
16): "engine-banks", each layer its own bank (5.1 GB in all, as in the engine), and
"engine-shared", one bank per shape reused by every layer (the same kernels and grids).

    python benchmarks/scripts/graph_launch.py OUT.json
"""

import json
import sys
from datetime import UTC, datetime

import torch
from engine_steps import replay_times  # this folder: back to back, launch call, from idle

from loraflow.multi import triton_lora
from loraflow.multi.triton_lora import PackedLoRA


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bank(d_in: int, d_out: int, n_slots: int = 64, r: int = 16) -> PackedLoRA:
    dev, dt = "cuda", torch.bfloat16
    return PackedLoRA(
        a=torch.randn(n_slots * r, d_in, device=dev, dtype=dt) * 0.01,
        bt=torch.randn(n_slots * r, d_out, device=dev, dtype=dt) * 0.01,
        offsets=torch.arange(n_slots, device=dev, dtype=torch.int32) * r,
        ranks=torch.full((n_slots,), r, device=dev, dtype=torch.int32),
        r_max=r,
    )


def engine_kinds(slots: torch.Tensor) -> list[dict]:
    """One decode step's 224 (shrink, expand) pairs at Llama-2-7B's shapes: separate banks
    per layer, or one bank per shape shared by all layers."""
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q k v o gate up down
    xs = {d: torch.randn(64, d, device="cuda", dtype=torch.bfloat16) for d in (4096, 11008)}
    shared = {s: bank(*s) for s in set(shapes)}
    rows = []
    for kind in ("engine-shared", "engine-banks"):
        banks = [(s, shared[s] if kind == "engine-shared" else bank(*s)) for _ in range(32) for s in shapes]

        def body():
            return [triton_lora.lora_delta(xs[d_in], slots, p, "rows") for (d_in, _), p in banks]

        rows.append({"kind": kind, "kernels": 2 * len(banks), **replay_times(capture(body), 30)})
        print(rows[-1], flush=True)
    return rows


def gemm_kinds(x: torch.Tensor, slots: torch.Tensor, packed: PackedLoRA) -> list[dict]:
    """224 cuBLAS GEMMs (64 x 4096 @ 4096 x 4096) in a chain, each alone, after a PyTorch
    kernel, or after the two LoRA kernels (as the engine's layers): whether the launch cost
    comes from Triton kernels next to cuBLAS's."""
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.01
    rows = []
    for kind in ("gemm", "torch+gemm", "lora+gemm"):

        def body():
            y = x
            for _ in range(224):
                if kind == "gemm":
                    y = y @ w.T
                elif kind == "torch+gemm":
                    y = (y * 1.0001) @ w.T
                else:
                    y = triton_lora.lora_delta(y, slots, packed, "rows").addmm_(y, w.T)
            return y

        rows.append(
            {
                "kind": kind,
                "kernels": 224 * (1 + (kind != "gemm") + (kind == "lora+gemm")),
                **replay_times(capture(body), 30),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main():
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(64, 4096, device=dev, dtype=dt)
    slots = torch.arange(64, device=dev, dtype=torch.int32)
    packed = bank(4096, 4096)
    rows = gemm_kinds(x, slots, packed) + engine_kinds(slots)
    for kind in ("torch", "lora", "both"):
        for n in (112, 224, 448, 896, 1344) + ((2048, 3072, 4096, 4608, 6144, 8192) if kind == "torch" else ()):

            def body():
                y = x
                for _ in range(n // (2 if kind == "both" else 1) if kind != "lora" else 0):
                    y = y * 1.0001  # one PyTorch kernel
                for _ in range(n // 2 // (2 if kind == "both" else 1) if kind != "torch" else 0):
                    y = triton_lora.lora_delta(x, slots, packed, "rows")  # two Triton kernels
                return y

            rows.append({"kind": kind, "kernels": n, **replay_times(capture(body), 30)})
            print(rows[-1], flush=True)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/graph_launch.py {sys.argv[1]}",
        "rows": rows,
    }
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
