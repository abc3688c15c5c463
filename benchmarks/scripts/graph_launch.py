"""What a CUDA graph's launch costs the host, by what the graph holds: n small PyTorch ops, or
n (shrink, expand) pairs of the per-row LoRA kernels, or both. The decode step's graph
with adapters took 0.65 ms to launch against 0.08 ms without, and halving its Triton
launches did not change that (NOTES-serve.md, session 4); this separates a cost per node,
per Triton node, or a threshold in the number of nodes.

    python benchmarks/scripts/graph_launch.py OUT.json
"""

import json
import sys
from datetime import datetime, timezone

import torch

from engine_steps import replay_times          # this folder: back to back, launch call, from idle
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


def main():
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(64, 4096, device=dev, dtype=dt)
    slots = torch.arange(64, device=dev, dtype=torch.int32)
    n_slots, r = 64, 16
    packed = PackedLoRA(a=torch.randn(n_slots * r, 4096, device=dev, dtype=dt) * 0.01,
                        bt=torch.randn(n_slots * r, 4096, device=dev, dtype=dt) * 0.01,
                        offsets=torch.arange(n_slots, device=dev, dtype=torch.int32) * r,
                        ranks=torch.full((n_slots,), r, device=dev, dtype=torch.int32), r_max=r)
    rows = []
    for kind in ("torch", "lora", "both"):
        for n in (112, 224, 448, 896, 1344):
            def body():
                y = x
                for _ in range(n // (2 if kind == "both" else 1) if kind != "lora" else 0):
                    y = y * 1.0001                                              # one PyTorch kernel
                for _ in range(n // 2 // (2 if kind == "both" else 1) if kind != "torch" else 0):
                    y = triton_lora.lora_delta(x, slots, packed, "rows")        # two Triton kernels
                return y
            rows.append({"kind": kind, "kernels": n, **replay_times(capture(body), 30)})
            print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": f"python benchmarks/scripts/graph_launch.py {sys.argv[1]}", "rows": rows}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
