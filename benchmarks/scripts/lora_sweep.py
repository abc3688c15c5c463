"""Launch configurations of the decode LoRA kernels at the engine's shapes, to choose
``triton_lora.DEFAULTS["rows"]`` (used by the per-layer and the sibling launches): 64 tokens,
64 slots of rank 16, Llama-2-7B's layers as the "siblings" decode kernel runs them, q/k/v
and gate/up sharing their launches, o and down alone. Each case rotates over 8 separate
banks (more than the L2 cache holds) inside a CUDA graph; prints the best configurations by
the sum over the four cases (each runs 32 times a decode step) and writes them all.

    python benchmarks/scripts/lora_sweep.py OUT.json
"""

import itertools
import json
import sys
from datetime import UTC, datetime

import torch
from graph_launch import bank  # this folder: a bank of 64 slots of rank 16

from loraflow.bench.timing import copy_bandwidth_gbs, time_ms, warm_up_gpu
from loraflow.multi import triton_lora
from loraflow.multi.triton_siblings import lora_delta_siblings

CASES = {
    "q/k/v": (4096, [4096, 4096, 4096]),
    "gate/up": (4096, [11008, 11008]),
    "o": (4096, [4096]),
    "down": (11008, [4096]),
}


def main():
    warm_up_gpu()
    bandwidth = copy_bandwidth_gbs()
    slots = torch.randperm(64, device="cuda").to(torch.int32)
    sets = {
        name: [
            (torch.randn(64, d_in, device="cuda", dtype=torch.bfloat16), [bank(d_in, d) for d in outs])
            for _ in range(8)
        ]
        for name, (d_in, outs) in CASES.items()
    }
    configs = [
        dict(block_k=bk, split_k=sk, block_n=bn, warps=w)
        for bk, sk, bn, w in itertools.product([128, 256, 512], [0, 4, 8, 16, 32], [256, 512, 1024, 2048], [2, 4, 8])
    ]
    results = []
    for cfg in configs:
        row = {**cfg}
        for name, cases in sets.items():
            if len(CASES[name][1]) > 1:
                fns = [lambda x=x, b=b: lora_delta_siblings(x, slots, b, config=cfg) for x, b in cases]
            else:
                fns = [lambda x=x, b=b: triton_lora.lora_delta(x, slots, b[0], "rows", config=cfg) for x, b in cases]
            row[name] = 1e3 * time_ms(fns)
        row["layer_us"] = sum(row[n] for n in CASES)
        results.append(row)
    results.sort(key=lambda r: r["layer_us"])
    layer_bytes = sum(64 * 16 * (d_in + d) * 2 for d_in, outs in CASES.values() for d in outs)
    floor_us = layer_bytes / (bandwidth * 1e9) * 1e6
    default = next(r for r in results if all(r[k] == v for k, v in triton_lora.DEFAULTS["rows"].items()))
    print(
        f"copy bandwidth {bandwidth:.0f} GB/s; one layer's adapters {layer_bytes / 1e6:.0f} MB, "
        f"{floor_us:.1f} us at that bandwidth; the default: {default}"
    )
    for r in results[:10]:
        print(" ", {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/lora_sweep.py {sys.argv[1]}",
        "copy_bandwidth_gbs": bandwidth,
        "layer_floor_us": floor_us,
        "default": default,
        "results": results,
    }
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
