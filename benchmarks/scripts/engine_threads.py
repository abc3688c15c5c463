"""CPU: the cost of an engine step, and of the ops it runs, on the thread that built the
engine and on another thread (the finding behind `loraflow serve` running the engine on the
main thread; benchmarks/NOTES-serve.md).

    python benchmarks/scripts/engine_threads.py > benchmarks/results/engine-threads-cpu.txt
"""

import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import loraflow as lf
from loraflow.bench import serve as bench
from loraflow.serve.sampling import SamplingParams


def ops(tag):
    x, w = torch.randn(8, 576), torch.randn(1536, 576)
    a, rows = torch.randn(64 * 16, 576), torch.randint(0, 64 * 16, (8, 16))
    for _ in range(50):
        torch.nn.functional.linear(x, w), torch.bmm(a[rows], x.unsqueeze(2))
    t0 = time.perf_counter()
    for _ in range(2000):
        torch.nn.functional.linear(x, w)
    t1 = time.perf_counter()
    for _ in range(2000):
        torch.bmm(a[rows], x.unsqueeze(2))
    t2 = time.perf_counter()
    print(
        f"{tag:>14}: linear 8x576 @ 576x1536 {(t1 - t0) / 2 * 1e3:6.1f} us, gather + bmm {(t2 - t1) / 2 * 1e3:6.1f} us",
        flush=True,
    )


def steps(eng, tag):
    def run(adapters, n_out=8):
        reqs = [
            eng.add_request(list(range(100, 132)), SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True), a)
            for a in adapters
        ]
        times = []
        while not all(r.finished for r in reqs):
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        return times

    run([f"a{i}" for i in range(4)], 2)  # bring the adapters to the bank
    for name, ads in [("base", [None] * 8), ("adapters", [f"a{i % 4}" for i in range(8)])]:
        t = run(ads)
        print(
            f"{tag:>14}: {name:8} 8 requests, prefill step {t[0]:.3f} s, decode step median "
            f"{statistics.median(t[1:]):.3f} s",
            flush=True,
        )


def on_thread(fn, *args):
    th = threading.Thread(target=fn, args=args)
    th.start()
    th.join()


if __name__ == "__main__":
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print("# python benchmarks/scripts/engine_threads.py")
    eng = lf.Engine(device="cpu", max_gpu_adapters=4, max_lora_rank=16)
    for i, f in enumerate(bench.make_adapters(eng.bank.shapes(), Path(tempfile.mkdtemp()), 4, 16)):
        eng.registry.register(f"a{i}", f)
    ops("main thread")
    steps(eng, "main thread")
    on_thread(ops, "second thread")
    on_thread(steps, eng, "second thread")
