"""CPU: one decode layer's adapter paths at SmolLM2's 576 -> 1536 shape, 16 tokens on 16
distinct rank-16 adapters (a bank of 16 slots): the base matmul alone, the gathered rows +
bmm path, and the masked whole-bank path (serve/bank.py). Median microseconds of 500 calls.

    python benchmarks/scripts/bank_decode_paths.py
"""

import platform
import statistics
import time
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from loraflow.serve.bank import TokenSlots

torch.manual_seed(0)
N, S, r, d_in, d_out = 16, 16, 16, 576, 1536
a, bt, x, w = torch.randn(S * r, d_in), torch.randn(S * r, d_out), torch.randn(N, d_in), torch.randn(d_out, d_in)
ids = torch.randperm(S)[:N]
rows = ids[:, None] * r + torch.arange(r)
mask = TokenSlots.slot_mask(ids, S, r, torch.float32)


def base():
    return F.linear(x, w)


def gathered():
    h = torch.bmm(a[rows], x.unsqueeze(2))
    return torch.bmm(bt[rows].transpose(1, 2), h)[:, :, 0]


def masked():
    return (F.linear(x, a) * mask) @ bt


torch.testing.assert_close(gathered(), masked(), rtol=1e-4, atol=1e-3)
print(
    f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
    f"torch {torch.__version__}, {torch.get_num_threads()} threads"
)
for f in (base, gathered, masked):
    for _ in range(20):
        f()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            f()
        times.append((time.perf_counter() - start) / 100 * 1e6)
    print(f"{f.__name__:>9}: {statistics.median(times):7.1f} us")
