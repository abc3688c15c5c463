"""Timing on the GPU the way METHOD.md asks: device events, warm-up, medians, cold caches.

``time_ms(fns)`` calls ``fns`` round-robin: each entry uses its own inputs, and together
they are several times the L2 cache, so every call reads its weights from memory. Code
without host syncs is captured in a CUDA graph and replayed (no launch gaps); code with host
syncs (the loop and segmented ops, PEFT) runs eagerly, as it would in a model.
"""

from __future__ import annotations

import statistics
import time

import torch


def time_ms(fns, graph: bool = True, reps: int = 15, inner: int = 5) -> float:
    """Median milliseconds per call."""
    if not torch.cuda.is_available():
        for f in fns:
            f()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for f in fns:
                f()
            times.append((time.perf_counter() - start) * 1e3 / len(fns))
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles kernels, fills allocator pools
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        run = g.replay
    else:

        def run():
            for f in fns:
                f()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (inner * len(fns)))
    return statistics.median(times)


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy long enough for its clocks to ramp up before anything is timed."""
    if not torch.cuda.is_available():
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth, bytes read plus written, in GB/s: the best of a
    graph-captured and an eager copy of 1 and 4 GiB."""
    if not torch.cuda.is_available():
        return float("nan")
    best = 0.0
    for gib in (1, 4):
        src = torch.randn(gib * 2**29, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        for graph in (True, False):
            ms = time_ms([lambda d=dst, s=src: d.copy_(s)], graph=graph, reps=10, inner=3)
            best = max(best, 2 * src.numel() * 2 / (ms * 1e-3) / 1e9)
        del src, dst
    return best


def rotations(set_bytes: int, l2_bytes: int = 60 * 2**20, cap: int = 8) -> int:
    """How many input sets make the working set at least 4x the L2 cache."""
    return max(1, min(cap, -(-4 * l2_bytes // max(1, set_bytes))))
